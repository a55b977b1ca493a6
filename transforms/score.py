"""The three scores of a pair against the reference bank, and the Beam step that adds them.

The bank is ``score.bank_size`` embedded pairs of the input, a side input built in a
pass of its own (:mod:`capgap.transforms.bank`): their images AND their captions.
:class:`ScorePairs` scores every embedded pair (:mod:`capgap.transforms.embed`) against
it. The pair itself is left out of its own bank, leaving n_i bank pairs. With all
embeddings L2-normalised, s_ii = cos(image_i, caption_i), s_ij = cos(bank_image_j,
caption_i) (caption -> image) and r_ij = cos(image_i, bank_caption_j) (image -> caption):

- ``clip_score`` = s_ii.
- ``certainty`` (does the caption point at this image, and the image at this caption?),
  ``score.certainty``:

  ``dual_softmax`` (default): sigma(log(1 + n_i) - l_i), sigma the logistic function and
  l_i = -(log p(image_i | caption_i) + log p(caption_i | image_i)) / 2 the pair's
  symmetric contrastive (CLIP InfoNCE) loss against the bank at temperature tau, where
  p(image_i | caption_i) = exp(s_ii / tau) / (exp(s_ii / tau) + sum_j exp(s_ij / tau))
  and p(caption_i | image_i) the same over r_ij. Equivalently rho / (1 + rho) with
  rho = (1 + n_i) * sqrt(p(image_i | caption_i) * p(caption_i | image_i)): the
  geometric mean of the two probabilities relative to chance, 1 / (1 + n_i): 0.5 is
  chance. A caption written for another image has both probabilities far below chance
  (certainty near 0); a terse but correct caption shares p(image | caption) with the m
  bank images it fits about as well, ~1 / (1 + m), instead of being measured against
  the best of them as ``margin`` does. 1 when n_i = 0.
  ``clip``: (1 + s_ii) / 2, the CLIP score on [0, 1] (the baseline: no bank).
  ``margin``: exp(min(0, s_ii - q_i) / tau), q_i the ``score.margin_quantile`` of the
  s_ij; ``rank``: the fraction of bank images the own image beats (caption -> image
  only: a terse caption, which fits many bank images, scores low on both).
- ``imbalance`` (how much of the image the caption leaves unsaid),
  ``score.imbalance``: ``ambiguity`` (default): log(1 + #{j: s_ij >= s_ii}) /
  log(1 + n_i): the share of the bank's log-size the caption leaves unresolved (0:
  it singles its image out; 1: every image fits it as well); ``entropy``: the
  DESIGN.md sketch, normalised entropy of the softmax over {s_ii} and the s_ij at
  temperature tau (the own image must be in the softmax, else a specific caption
  of an image unlike any bank image looks as vague as a terse one).

tau is the model's own temperature (1 / exp(logit_scale)) unless ``score.tau`` is set.
``capgap check-scores`` validates the choices against the synthetic ground truth (AUROC
per number of attributes named; ``--compare`` scores every certainty option). Issue 16,
the demo's reference on its ``web`` split: certainty AUROC dual_softmax 0.990, clip
0.989, margin 0.989, rank 0.982 (10 + 8 epochs; with 5 + 8: 0.911, 0.909, 0.887, 0.863).
``benchmarks/certainty_candidates.py`` scores 21 more definitions on the same embeddings
(other tau, one direction, CSLS, bidirectional margins, the CLIP score calibrated per
imbalance level, rank averages; ``docs/results/certainty/``): on this reference, the
5 + 8 one and the longer 10 + 20 one none beats dual_softmax overall by more than 0.0003
(within one standard error), nor without falling below clip in a k bucket. margin and
rank lose terse correct captions, which fit many bank images as well as their own; a
softmax over the bank at the model's tau does not, and adding the image -> caption
direction helps a little more (caption -> image alone: 0.908).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_type_hints

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows


@dataclass
class ScoreConfig:
    bank_size: int = 2048  # reference images sampled from the input
    bank_oversample: float = 1.25  # candidates embedded per bank slot (spares for bad images)
    bank_salt: str = "capgap-bank-v1"  # changes which uids the hash picks
    tau: float | None = None  # softmax temperature; None: the model's own
    certainty: Literal["dual_softmax", "clip", "margin", "rank"] = "dual_softmax"
    margin_quantile: float = 0.99  # 'margin': compare against this quantile of s_j
    imbalance: Literal["ambiguity", "entropy"] = "ambiguity"
    batch_size: int = 256  # pairs scored together (one matrix product against the bank)
    # Similarities this close count as ties: different batchings through the model move
    # embeddings by ~1e-7, which must not flip counts (e.g. a duplicate of a bank image).
    tie_tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.bank_size < 2:
            raise ValueError("score.bank_size must be >= 2")
        if self.bank_oversample < 1.0:
            raise ValueError("score.bank_oversample must be >= 1")
        if self.tau is not None and self.tau <= 0:
            raise ValueError("score.tau must be positive")
        if not 0.0 < self.margin_quantile <= 1.0:
            raise ValueError("score.margin_quantile must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError("score.batch_size must be >= 1")
        if self.tie_tolerance < 0:
            raise ValueError("score.tie_tolerance must be >= 0")


# The score.certainty options, the default first.
CERTAINTY_METHODS: tuple[str, ...] = get_args(get_type_hints(ScoreConfig)["certainty"])


# --- the scores (pure numpy) -----------------------------------------------------------------


def batch_scores(
    images: np.ndarray,
    texts: np.ndarray,
    bank_images: np.ndarray,
    tau: float,
    cfg: ScoreConfig,
    exclude: Sequence[int | None] | None = None,
    bank_texts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """clip_score, certainty and imbalance of b pairs against the bank, vectorised.

    ``exclude[i]`` is the bank index of pair i itself (it is left out of its own bank,
    image and caption). ``bank_texts`` are the bank pairs' caption embeddings, row for
    row with ``bank_images``; only ``dual_softmax`` certainty needs them. With s_ii =
    cos(image_i, text_i), s_ij = cos(bank_image_j, text_i) and r_ij = cos(image_i,
    bank_text_j) over the n_i remaining bank pairs:

    - dual_softmax certainty: 1 / (1 + exp(l_i - log(1 + n_i))), with the symmetric
      contrastive loss l_i = (LSE_i(s) + LSE_i(r)) / 2 - s_ii / tau, where
      LSE_i(s) = log(exp(s_ii / tau) + sum_j exp(s_ij / tau)) and LSE_i(r) the same over
      the r_ij; 1 when n_i = 0;
    - clip certainty: (1 + s_ii) / 2;
    - rank certainty: (#{s_ij < s_ii} + #{s_ij = s_ii} / 2) / n_i (equality up to
      ``tie_tolerance``, as in the count below);
    - margin certainty: exp(min(0, s_ii - t_i) / tau), t_i the nearest-rank
      ``margin_quantile`` of the s_ij;
    - ambiguity imbalance: log(1 + #{s_ij >= s_ii}) / log(1 + n_i): how many other
      images the caption fits at least as well as its own (0: it singles its image
      out; 1: it fits every image as well), i.e. the fraction of the bank's
      log-size the caption leaves unresolved;
    - entropy imbalance: entropy of softmax({s_ii} + {s_ij} / tau) / log(1 + n_i).
    """
    if cfg.certainty not in CERTAINTY_METHODS:
        raise ValueError(
            f"score.certainty: {cfg.certainty!r} is not one of {list(CERTAINTY_METHODS)}"
        )
    images = np.asarray(images, dtype=np.float64)
    texts = np.asarray(texts, dtype=np.float64)
    bank = np.asarray(bank_images, dtype=np.float64)
    b, n = len(images), len(bank)
    s_self = np.einsum("ij,ij->i", images, texts)
    sims = texts @ bank.T if n else np.zeros((b, 0))
    n_eff = np.full(b, n, dtype=np.int64)
    rows = [i for i, j in enumerate(exclude or []) if j is not None]
    cols = [j for j in (exclude or []) if j is not None]
    if rows:
        # An excluded entry is set to -inf: below every s_ii, never a tie, never at least
        # s_ii, first in sorted order (the quantile below skips it), exp() of it is 0.
        sims[rows, cols] = -np.inf
        n_eff[rows] -= 1
    n_excluded = n - n_eff
    self_col = s_self[:, None]
    eps = cfg.tie_tolerance
    below = np.count_nonzero(sims < self_col - eps, axis=1) - n_excluded
    at_least = n_eff - below
    safe_n = np.maximum(n_eff, 1)
    if cfg.certainty == "clip":
        certainty = (1.0 + s_self) / 2.0
    elif cfg.certainty == "dual_softmax":
        if n and bank_texts is None:
            raise ValueError("score.certainty=dual_softmax needs the bank's captions (bank_texts)")
        back = images @ np.asarray(bank_texts, dtype=np.float64).T if n else np.zeros((b, 0))
        if rows:
            back[rows, cols] = -np.inf
        loss = (
            _log_softmax_denominator(s_self, sims, tau)
            + _log_softmax_denominator(s_self, back, tau)
        ) / 2.0 - s_self / tau
        certainty = np.where(n_eff > 0, _sigmoid(np.log1p(n_eff) - loss), 1.0)
    elif cfg.certainty == "rank":
        ties = np.count_nonzero(np.abs(sims - self_col) <= eps, axis=1)
        certainty = np.where(n_eff > 0, (below + 0.5 * ties) / safe_n, 1.0)
    elif n:
        # Nearest-rank quantile among the n_eff valid entries, which follow the excluded
        # (-inf) ones in sorted order; only these positions need to be in place.
        rank = np.clip(np.ceil(cfg.margin_quantile * n_eff).astype(np.int64) - 1, 0, None)
        position = np.minimum(rank + n_excluded, n - 1)
        ordered = np.partition(sims, np.unique(position), axis=1)
        top = np.where(n_eff > 0, ordered[np.arange(b), position], s_self)
        certainty = np.exp(np.minimum(0.0, s_self - top) / tau)
    else:
        certainty = np.ones(b)
    log_n = np.log1p(n_eff)
    if cfg.imbalance == "ambiguity":
        imbalance = np.where(n_eff > 0, np.log1p(at_least) / np.where(log_n > 0, log_n, 1), 0.0)
    else:
        logits = np.concatenate([self_col, sims], axis=1) / tau
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0.0)
        entropy = -plogp.sum(axis=1)
        imbalance = np.where(n_eff > 0, entropy / np.where(log_n > 0, log_n, 1), 0.0)
    return {
        "clip_score": s_self,
        "certainty": np.clip(certainty, 0.0, 1.0),
        "imbalance": np.clip(imbalance, 0.0, 1.0),
    }


def _log_softmax_denominator(s_self: np.ndarray, sims: np.ndarray, tau: float) -> np.ndarray:
    """log(exp(s_self / tau) + sum_j exp(sims_j / tau)) per row; -inf entries count 0."""
    top = np.maximum(s_self, sims.max(axis=1)) if sims.shape[1] else s_self  # finite
    shifted = sims - top[:, None]  # one (b, n) temporary, exponentiated in place
    shifted /= tau
    np.exp(shifted, out=shifted)
    return top / tau + np.log(np.exp((s_self - top) / tau) + shifted.sum(axis=1))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def pair_scores(
    image: np.ndarray,
    text: np.ndarray,
    bank_images: np.ndarray,
    tau: float,
    cfg: ScoreConfig,
    exclude: int | None = None,
    bank_texts: np.ndarray | None = None,
) -> dict[str, float]:
    """:func:`batch_scores` of one pair, as plain floats."""
    out = batch_scores(
        image[None, :], text[None, :], bank_images, tau, cfg, [exclude], bank_texts=bank_texts
    )
    return {k: float(v[0]) for k, v in out.items()}


# --- Beam transforms -------------------------------------------------------------------------


# Keys of an embedded row that only scoring and the bank use; scored rows go on without them.
_MODEL_ONLY = frozenset({"image_embedding", "text_embedding", "logit_scale"})


class _ScoreFn(beam.DoFn):
    """(uid, row) -> (uid, row with scores), ``batch_size`` rows per matrix product.

    Rows are buffered here rather than by ``BatchElements``: Beam samples the encoded size
    of elements, every one of the first few dozen, and a batch of rows (embeddings, image
    bytes) costs more to encode for that than to score.
    """

    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg
        self._bank_id = None
        self._index: dict[str, int] = {}

    def setup(self) -> None:
        self.scored = Metrics.counter("capgap", "scored")

    def start_bundle(self) -> None:
        self._batch: list[tuple[str, dict[str, Any]]] = []
        self._bank: dict[str, Any] | None = None

    def process(self, element, bank) -> Iterator[Any]:
        self._bank = bank
        self._batch.append(element)
        if len(self._batch) >= self.cfg.batch_size:
            yield from self._score()

    def finish_bundle(self) -> Iterator[Any]:
        # finish_bundle gets no side input; the bank is a global-window singleton, so the
        # one process() was given holds for the whole bundle.
        for scored in self._score():
            yield GlobalWindows.windowed_value_at_end_of_window(scored)

    def _score(self) -> Iterator[tuple[str, dict[str, Any]]]:
        batch, bank = self._batch, self._bank
        self._batch = []
        if not batch:
            return
        if self._bank_id != id(bank):
            self._bank_id = id(bank)
            self._index = {u: i for i, u in enumerate(bank["uids"])}
        scores = batch_scores(
            np.stack([row["image_embedding"] for _, row in batch]),
            np.stack([row["text_embedding"] for _, row in batch]),
            bank["images"],
            bank["tau"],
            self.cfg,
            exclude=[self._index.get(uid) for uid, _ in batch],
            bank_texts=bank.get("texts"),
        )
        columns = [(name, values.tolist()) for name, values in scores.items()]
        for i, (uid, row) in enumerate(batch):
            out = dict(row)  # a copy without the model-only keys, in C rather than a comprehension
            for key in _MODEL_ONLY:
                out.pop(key, None)
            for name, values in columns:
                out[name] = values[i]
            yield uid, out
        self.scored.inc(len(batch))


class ScorePairs(beam.PTransform):
    """(uid, embedded row) + bank side input -> (uid, row with clip_score/certainty/imbalance)."""

    def __init__(self, cfg: ScoreConfig, bank) -> None:
        super().__init__()
        self.cfg = cfg
        self.bank = bank

    def expand(self, rows):
        bank = beam.pvalue.AsSingleton(self.bank)
        return rows | "Score" >> beam.ParDo(_ScoreFn(self.cfg), bank=bank)
