"""The reference bank, built in a pass of its own so that no input row waits at a barrier.

Scores compare each caption against a bank of images sampled from the input (see
:mod:`capgap.transforms.score`). Sampling that bank from the main stream of embedded
rows would hold every row, image bytes and all, until the last one is embedded (a
side-input barrier: materialised on DirectRunner, shuffled on Dataflow). Instead
``capgap curate`` reads its input three times, and the main pass flows through from
read to write in one fused stage:

1. index: every record's uid and ref (source shard, row index), read from as little of
   each shard as the uids need (Parquet: the uid column) -> :class:`FirstRefs`
   (dedup.py): the duplicates side input, and the bank candidates here;
2. bank: the candidates, ``ceil(score.bank_size * score.bank_oversample)`` first-seen
   uids with the smallest salted hash (so the choice is independent of order and
   sharding), are read again (only the rows at their first refs: a later copy of a
   duplicate uid never enters the bank), decoded and embedded; the ``bank_size``
   smallest of those that embed become the bank. The surplus stands in for candidates
   that fail to decode; if more fail than that, the bank is smaller (its size is in the
   manifest);
3. main: dedup, decode, embed, score against the bank, decide, write.

The index and bank passes cost a uid-only read and a selective read of the input (Parquet
and HF skip the unselected rows before converting them; tar and CSV are read whole) and
``bank_size * bank_oversample`` extra embeddings, whatever the input's size. The bank
pass's failures are not reported: the main pass meets the same records and records them.
Its counters use the ``capgap_bank`` namespace, the index pass's ``capgap_index``.

Everything about the bank lives here: which uids (:func:`uid_hash`, :class:`BankCandidates`),
the bank itself (:class:`SampleBank`, :func:`make_bank`) and what the manifest records of
it (:func:`bank_summary`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import apache_beam as beam
import numpy as np

from capgap.models.clip_handler import ClipModelConfig
from capgap.transforms.captions import CaptionConfig
from capgap.transforms.decode import DecodeConfig, DecodeRecords
from capgap.transforms.embed import EmbedPairs
from capgap.transforms.readers import InputPlan, ReadRecords
from capgap.transforms.score import ScoreConfig

BANK_NAMESPACE = "capgap_bank"
INDEX_NAMESPACE = "capgap_index"


def uid_hash(uid: str, salt: str) -> int:
    """A 64-bit hash of a uid, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{salt}\0{uid}".encode("utf-8", "backslashreplace"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def candidate_count(cfg: ScoreConfig) -> int:
    """How many uids the bank pass embeds for a bank of ``cfg.bank_size``."""
    return math.ceil(cfg.bank_size * cfg.bank_oversample)


class BankCandidates(beam.PTransform):
    """:class:`FirstRefs` pairs -> one ``{uid: first ref}`` dict of the bank candidates."""

    def __init__(self, cfg: ScoreConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def expand(self, first_refs):
        salt = self.cfg.bank_salt
        return (
            first_refs
            | "Hashed" >> beam.Map(lambda kv: (uid_hash(kv[0], salt), kv[0], kv[1][1]))
            | "Smallest"
            >> beam.combiners.Top.Smallest(candidate_count(self.cfg), key=lambda e: e[:2])
            | "AsDict" >> beam.Map(lambda entries: {uid: ref for _, uid, ref in entries})
        )


class EmbedBank(beam.PTransform):
    """:class:`FirstRefs` of the input -> the bank dict (for ``AsSingleton``), from a new read."""

    def __init__(
        self,
        plan: InputPlan,
        decode: DecodeConfig,
        caption: CaptionConfig,
        model: ClipModelConfig,
        score: ScoreConfig,
        embed: beam.PTransform | None = None,
    ) -> None:
        super().__init__()
        self.plan, self.decode, self.caption = plan, decode, caption
        self.model, self.score = model, score
        self.embed = embed  # replaces EmbedPairs(model), e.g. a cached embedding stage

    def expand(self, first_refs):
        candidates = first_refs | "Candidates" >> BankCandidates(self.score)
        model = dataclasses.replace(
            self.model, metrics_namespace=f"{self.model.metrics_namespace}_bank"
        )
        picked = first_refs.pipeline | "Read" >> ReadRecords(
            self.plan, BANK_NAMESPACE, select=candidates
        )
        decoded = picked | "Decode" >> DecodeRecords(self.decode, self.caption, BANK_NAMESPACE)
        embedded = decoded.ok | "Embed" >> (self.embed or EmbedPairs(model))
        return embedded["ok"] | "Sample" >> SampleBank(self.score)


class SampleBank(beam.PTransform):
    """Embedded rows -> one bank dict {uids, images, texts, tau} (for ``AsSingleton``)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def expand(self, rows):
        salt, tau = self.cfg.bank_salt, self.cfg.tau
        return (
            rows
            | "Keyed"
            >> beam.Map(
                lambda kv: (
                    uid_hash(kv[0], salt),
                    kv[0],
                    kv[1]["image_embedding"],
                    kv[1]["text_embedding"],
                    kv[1]["logit_scale"],
                )
            )
            | "Smallest" >> beam.combiners.Top.Smallest(self.cfg.bank_size, key=lambda e: e[:2])
            | "AsBank" >> beam.Map(make_bank, tau)
        )


def make_bank(entries: list[tuple], tau: float | None = None) -> dict[str, Any]:
    """Bank arrays from (hash, uid, image, text, logit_scale) entries sorted by (hash, uid)."""
    entries = sorted(entries, key=lambda e: e[:2])
    if not entries:
        return {"uids": [], "images": np.zeros((0, 0), np.float32), "tau": tau or 0.01}
    scale = float(entries[0][4])
    return {
        "uids": [e[1] for e in entries],
        "images": np.stack([e[2] for e in entries]).astype(np.float32),
        "texts": np.stack([e[3] for e in entries]).astype(np.float32),
        "tau": float(tau) if tau is not None else 1.0 / scale,
    }


def bank_summary(bank: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about the bank: size, tau and a hash of its uids."""
    digest = hashlib.sha256("\n".join(bank["uids"]).encode("utf-8", "backslashreplace"))
    return {"size": len(bank["uids"]), "tau": bank["tau"], "uids_sha256": digest.hexdigest()}
