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
   manifest). The embedded candidates left out of the bank ride along as its spares;
3. main: dedup, decode, embed, score against the bank, decide, write. A row of the bank
   or of its spares takes its embeddings from there (:class:`EmbedOutsideBank`): the bank
   pass embedded the same record with the same model, decode and caption settings.

The index and bank passes cost a uid-only read and a selective read of the input (Parquet
and HF skip the unselected rows before converting them; tar and CSV are read whole);
every candidate embedded there is embedded once in all, whatever the input's size. The
bank pass's failures are not reported: the main pass meets the same records and records
them.
Its counters use the ``capgap_bank`` namespace, the index pass's ``capgap_index``.

Everything about the bank lives here: which uids (:func:`uid_hash`, :class:`BankCandidates`),
the bank itself (:class:`SampleBank`, :func:`make_bank`) and what the manifest records of
it (:func:`bank_summary`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import math
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindows

from capgap.models.clip_handler import PRECOMPUTED, ClipModelConfig, precomputed
from capgap.transforms.captions import CaptionConfig
from capgap.transforms.decode import DecodeConfig, DecodeRecords
from capgap.transforms.embed import EmbedPairs
from capgap.transforms.readers import InputPlan, ReadRecords, record_ref
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


class _SmallestHashesFn(beam.DoFn):
    """:class:`FirstRefs` blocks -> the bundle's ``n`` smallest (uid hash, uid, ref), sorted,
    as one list; the hash is computed here, and the running list is cut back to ``n`` by
    ``heapq.nsmallest`` (plain tuples, compared in C) whenever it reaches ``2 n``."""

    def __init__(self, n: int, salt: str) -> None:
        self.n, self.salt = n, salt

    def start_bundle(self) -> None:
        self._entries: list[tuple] = []

    def process(self, block) -> Iterator[Any]:
        entries, salt = self._entries, self.salt
        for uid, (_, ref) in block:
            entries.append((uid_hash(uid, salt), uid, ref))
            if len(entries) >= 2 * self.n:
                entries[:] = heapq.nsmallest(self.n, entries)
        return ()

    def finish_bundle(self) -> Iterator[Any]:
        if self._entries:
            smallest = heapq.nsmallest(self.n, self._entries)
            self._entries = []
            yield GlobalWindows.windowed_value_at_end_of_window(smallest)


class _MergeSmallest(beam.CombineFn):
    """Sorted lists of (hash, uid, ref) -> the ``n`` smallest of them all, as ``{uid: ref}``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def create_accumulator(self) -> list[tuple]:
        return []

    def add_input(self, acc: list[tuple], entries: list[tuple]) -> list[tuple]:
        return heapq.nsmallest(self.n, [*acc, *entries])

    def merge_accumulators(self, accs) -> list[tuple]:
        return heapq.nsmallest(self.n, [e for acc in accs for e in acc])

    def extract_output(self, acc: list[tuple]) -> dict[str, Any]:
        return {uid: ref for _, uid, ref in acc}


class BankCandidates(beam.PTransform):
    """:class:`FirstRefs` blocks -> one ``{uid: first ref}`` dict of the bank candidates: the
    ``candidate_count`` uids with the smallest (salted hash, uid)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def expand(self, first_refs):
        n = candidate_count(self.cfg)
        return (
            first_refs
            | "SmallestPerBundle" >> beam.ParDo(_SmallestHashesFn(n, self.cfg.bank_salt))
            | "Smallest" >> beam.CombineGlobally(_MergeSmallest(n))
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
    """Embedded rows -> one bank dict {uids, images, texts, tau, spares} (for ``AsSingleton``):
    the ``bank_size`` rows with the smallest (salted hash, uid), the others of the
    ``candidate_count`` smallest as spares (the bank pass embeds no more than those)."""

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
                    record_ref(kv[1]),
                )
            )
            | "Smallest"
            >> beam.combiners.Top.Smallest(candidate_count(self.cfg), key=lambda e: e[:2])
            | "AsBank" >> beam.Map(make_bank, tau, self.cfg.bank_size)
        )


def make_bank(
    entries: list[tuple], tau: float | None = None, size: int | None = None
) -> dict[str, Any]:
    """Bank arrays from (hash, uid, image, text, logit_scale, ref) entries, in (hash, uid)
    order: ``uids``, ``refs``, ``images``, ``texts``, ``logit_scales`` and ``tau`` of the
    first ``size`` (default: all), and ``spares``: the rest as (uid, ref, image, text,
    logit_scale) tuples, whose embeddings the main pass reuses but scores never see."""
    entries = sorted(entries, key=lambda e: e[:2])
    spares: list[tuple] = []
    if size is not None:
        spares = [(e[1], e[5], e[2], e[3], float(e[4])) for e in entries[size:]]
        entries = entries[:size]
    if not entries:
        empty = np.zeros((0, 0), np.float32)
        return {
            "uids": [],
            "refs": [],
            "images": empty,
            "texts": empty,
            "logit_scales": [],
            "tau": tau or 0.01,
            "spares": spares,
        }
    scale = float(entries[0][4])
    return {
        "uids": [e[1] for e in entries],
        "refs": [e[5] for e in entries],
        "images": np.stack([e[2] for e in entries]).astype(np.float32),
        "texts": np.stack([e[3] for e in entries]).astype(np.float32),
        "logit_scales": [float(e[4]) for e in entries],
        "tau": float(tau) if tau is not None else 1.0 / scale,
        "spares": spares,
    }


def _embedded_by_bank_pass(bank: dict[str, Any]) -> dict[str, tuple]:
    """uid -> (ref, image, text, logit_scale) of every record the bank pass embedded: the
    bank's rows and its spares."""
    rows = {
        uid: (ref, bank["images"][i], bank["texts"][i], bank["logit_scales"][i])
        for i, (uid, ref) in enumerate(zip(bank["uids"], bank["refs"], strict=True))
    }
    for uid, ref, image, text, scale in bank["spares"]:
        rows[uid] = (ref, image, text, scale)
    return rows


class _FromBankFn(beam.DoFn):
    """(uid, pair) -> the same, and when the bank pass embedded this very record (its uid
    and its ref; a bank row or a spare) the pair without pixels, with that prediction for
    it (``PRECOMPUTED``)."""

    def setup(self) -> None:
        self._bank: dict[str, Any] | None = None
        self._rows: dict[str, tuple] = {}
        self.reused = beam.metrics.Metrics.counter("capgap", "embeddings_from_bank")

    def process(self, element, bank: dict[str, Any]) -> Iterator[Any]:
        if bank is not self._bank:  # a new side input value: index it once
            self._bank, self._rows = bank, _embedded_by_bank_pass(bank)
        uid, pair = element
        known_row = self._rows.get(uid)
        if known_row is None or PRECOMPUTED in pair or known_row[0] != record_ref(pair):
            yield element  # not embedded there, or with its embeddings already (the cache's)
            return
        known = {k: v for k, v in pair.items() if k != "pixels"}
        known[PRECOMPUTED] = precomputed(*known_row[1:])
        self.reused.inc()
        yield uid, known


class EmbedOutsideBank(beam.PTransform):
    """``embed`` (an :class:`~capgap.transforms.embed.EmbedPairs`) whose model embeds the main
    pass's rows that the bank pass did not; a bank row or spare passes through it with the
    embeddings the bank pass computed for the same record (the same model, decode and
    caption settings: the same pixels and tokens, so the same embeddings up to the float
    rounding of another batch). One stream, no Flatten (DirectRunner materialises one: ~55 us a row). (uid,
    pair) -> {"ok", "errors"} as ``embed`` returns; counter ``capgap/embeddings_from_bank``."""

    def __init__(self, embed: beam.PTransform, bank) -> None:
        super().__init__()
        self.embed, self.bank = embed, bank

    def expand(self, pairs):
        marked = pairs | "FromBank" >> beam.ParDo(
            _FromBankFn(), bank=beam.pvalue.AsSingleton(self.bank)
        )
        return marked | "Model" >> self.embed


def bank_summary(bank: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about the bank: size, tau and a hash of its uids."""
    digest = hashlib.sha256("\n".join(bank["uids"]).encode("utf-8", "backslashreplace"))
    return {"size": len(bank["uids"]), "tau": bank["tau"], "uids_sha256": digest.hexdigest()}
