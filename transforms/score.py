"""CLIP embedding through RunInference, the reference bank, and the three scores.

:class:`EmbedPairs` runs decoded pairs through ``RunInference`` with a keyed
:class:`~capgap.models.clip_handler.ClipModelHandler`; failed batches become
``errors/`` rows (``inference_failed``), non-finite embeddings too.
:class:`SampleBank` picks ``score.bank_size`` embedded pairs by a salted hash of
their uid (deterministic, independent of order and sharding) as a side input, and
:class:`ScorePairs` scores every pair against it. With s_j = cos(bank_image_j,
caption_i) over the bank (the pair itself excluded) and s_ii = cos(image_i, caption_i):

- ``clip_score`` = s_ii.
- ``certainty`` (does the caption point at this image?), ``score.certainty``:
  ``rank``: the fraction of bank images the own image beats for this caption
  (ties count half); ``margin``: exp((s_ii - max_q s_j) / tau) capped at 1, the
  odds of the own image against the caption's best bank images (the q-quantile
  ``score.margin_quantile`` of s_j), so a terse but correct caption, which fits
  many images about as well as its own, still scores near 1.
- ``imbalance`` (how much of the image the caption leaves unsaid),
  ``score.imbalance``: ``entropy``: normalised entropy of the softmax over
  {s_ii} and the s_j, at temperature tau: a caption that fits many different
  images says less than the image shows; one that singles out its own image
  says about as much. (The own image must be in the softmax: without it a
  specific caption of an image unlike any bank image looks as vague as a terse one.)

tau is the model's own temperature (1 / exp(logit_scale)) unless ``score.tau`` is set.
``capgap check-scores`` validates the choices against the synthetic ground truth.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from capgap.models.clip_handler import ClipModelConfig, ClipModelHandler
from capgap.transforms.reasons import Reason, Stage
from capgap.transforms.write import error_row

ERRORS_TAG = "errors"


@dataclass
class ScoreConfig:
    bank_size: int = 2048  # reference images sampled from the input
    bank_salt: str = "capgap-bank-v1"  # changes which uids the hash picks
    tau: float | None = None  # softmax temperature; None: the model's own
    certainty: Literal["rank", "margin"] = "margin"
    margin_quantile: float = 0.99  # 'margin': compare against this quantile of s_j
    imbalance: Literal["entropy"] = "entropy"

    def __post_init__(self) -> None:
        if self.bank_size < 2:
            raise ValueError("score.bank_size must be >= 2")
        if self.tau is not None and self.tau <= 0:
            raise ValueError("score.tau must be positive")
        if not 0.0 < self.margin_quantile <= 1.0:
            raise ValueError("score.margin_quantile must be in (0, 1]")


# --- the scores (pure numpy) -----------------------------------------------------------------


def uid_hash(uid: str, salt: str) -> int:
    """A 64-bit hash of a uid, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{salt}\0{uid}".encode("utf-8", "backslashreplace"), digest_size=8)
    return int.from_bytes(digest.digest(), "big")


def certainty_rank(s_self: float, s_bank: np.ndarray) -> float:
    """Fraction of bank images the own image beats for this caption (ties count half)."""
    if s_bank.size == 0:
        return 1.0
    return float((np.sum(s_bank < s_self) + 0.5 * np.sum(s_bank == s_self)) / s_bank.size)


def certainty_margin(s_self: float, s_bank: np.ndarray, tau: float, quantile: float) -> float:
    """exp((s_self - q-quantile of s_bank) / tau), capped at 1."""
    if s_bank.size == 0:
        return 1.0
    top = float(np.quantile(s_bank, quantile)) if quantile < 1.0 else float(s_bank.max())
    return float(math.exp(min(0.0, s_self - top) / tau))


def normalised_entropy(s_bank: np.ndarray, tau: float) -> float:
    """Entropy of softmax(s_bank / tau) divided by log(len(s_bank)), in [0, 1]."""
    n = s_bank.size
    if n < 2:
        return 0.0
    z = s_bank.astype(np.float64) / tau
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(n))


def pair_scores(
    image: np.ndarray,
    text: np.ndarray,
    bank_images: np.ndarray,
    tau: float,
    cfg: ScoreConfig,
    exclude: int | None = None,
) -> dict[str, float]:
    """clip_score, certainty and imbalance of one pair against the bank's images."""
    s_self = float(np.dot(image, text))
    s_bank = bank_images @ text
    if exclude is not None:
        s_bank = np.delete(s_bank, exclude)
    if cfg.certainty == "rank":
        certainty = certainty_rank(s_self, s_bank)
    else:
        certainty = certainty_margin(s_self, s_bank, tau, cfg.margin_quantile)
    return {
        "clip_score": s_self,
        "certainty": certainty,
        # The own image competes too: a specific caption singles it out (low entropy) even
        # when no bank image fits; a terse one spreads over every image it also fits.
        "imbalance": normalised_entropy(np.append(s_bank, s_self), tau),
    }


# --- Beam transforms -------------------------------------------------------------------------


def _failed_batch_rows(failed) -> Iterator[dict[str, Any]]:
    batch, exception = failed
    for item in batch:
        _, pair = item if isinstance(item, tuple) else (None, item)
        yield error_row(
            pair, Stage.EMBED, Reason.INFERENCE_FAILED, type(exception).__name__, str(exception)
        )


class _EmbeddedRowFn(beam.DoFn):
    """(uid, PredictionResult) -> the row without pixels, plus embeddings; NaN -> errors."""

    def process(self, element) -> Iterator[Any]:
        uid, result = element
        pair = {k: v for k, v in result.example.items() if k != "pixels"}
        inference = result.inference
        img, txt = inference["image_embedding"], inference["text_embedding"]
        if not (np.all(np.isfinite(img)) and np.all(np.isfinite(txt))):
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG,
                error_row(
                    pair, Stage.EMBED, Reason.EMBEDDING_NONFINITE, "ValueError", "NaN/inf embedding"
                ),
            )
            return
        pair["image_embedding"] = np.asarray(img, dtype=np.float32)
        pair["text_embedding"] = np.asarray(txt, dtype=np.float32)
        pair["logit_scale"] = float(inference["logit_scale"])
        pair["model_id"] = result.model_id
        yield uid, pair


class EmbedPairs(beam.PTransform):
    """(uid, pair) -> tagged ``ok`` (uid, row with embeddings) and ``errors`` rows."""

    def __init__(self, model: ClipModelConfig) -> None:
        super().__init__()
        self.model = model

    def expand(self, pairs):
        handler = KeyedModelHandler(ClipModelHandler(self.model))
        main, dlq = pairs | "RunInference" >> RunInference(handler).with_exception_handling()
        failed = dlq.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
        rows = main | "Rows" >> beam.ParDo(_EmbeddedRowFn()).with_outputs(ERRORS_TAG, main="ok")
        errors = (failed, rows[ERRORS_TAG]) | "EmbedErrors" >> beam.Flatten()
        return {"ok": rows.ok, ERRORS_TAG: errors}


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


class _ScoreFn(beam.DoFn):
    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg
        self._bank_id = None
        self._index: dict[str, int] = {}

    def setup(self) -> None:
        self.scored = Metrics.counter("capgap", "scored")

    def process(self, element, bank) -> Iterator[Any]:
        uid, row = element
        if self._bank_id != id(bank):
            self._bank_id = id(bank)
            self._index = {u: i for i, u in enumerate(bank["uids"])}
        scores = pair_scores(
            row["image_embedding"],
            row["text_embedding"],
            bank["images"],
            bank["tau"],
            self.cfg,
            exclude=self._index.get(uid),
        )
        out = {k: v for k, v in row.items() if k not in ("image_embedding", "text_embedding")}
        out.update(scores)
        self.scored.inc()
        yield uid, out


class ScorePairs(beam.PTransform):
    """(uid, embedded row) + bank side input -> (uid, row with clip_score/certainty/imbalance)."""

    def __init__(self, cfg: ScoreConfig, bank) -> None:
        super().__init__()
        self.cfg = cfg
        self.bank = bank

    def expand(self, rows):
        return rows | "Score" >> beam.ParDo(
            _ScoreFn(self.cfg), bank=beam.pvalue.AsSingleton(self.bank)
        )


def bank_summary(bank: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records about the bank: size, tau and a hash of its uids."""
    digest = hashlib.sha256("\n".join(bank["uids"]).encode("utf-8", "backslashreplace"))
    return {"size": len(bank["uids"]), "tau": bank["tau"], "uids_sha256": digest.hexdigest()}
