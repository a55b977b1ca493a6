"""The decision policy: keep, drop (low certainty / low CLIP score) or recaption.

Each rule compares one score with a threshold given ``absolute``ly, by
``quantile`` of that score over all scored rows, or as a DataComp-style
``top_fraction``; ``off`` disables the rule.

- ``drop`` (on ``certainty``): drop when the score is below the threshold;
  quantile q drops about the lowest q; top_fraction f keeps about the top f.
- ``drop_clip`` (on ``clip_score``): the same, a DataComp CLIP-score floor.
- ``recaption`` (on ``imbalance``): recaption the survivors whose score is above
  the threshold; quantile q recaptions above the q-quantile; top_fraction f
  recaptions about the top f.

Quantiles come from a fixed-bin histogram combine (``decide.histogram_bins``
bins over the score's range), which is exact up to one bin, mergeable in any
order and therefore identical on every runner and worker count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import apache_beam as beam
import numpy as np

from capgap.transforms.reasons import Reason

Mode = Literal["off", "absolute", "quantile", "top_fraction"]
SCORE_RANGES: dict[str, tuple[float, float]] = {
    "certainty": (0.0, 1.0),
    "imbalance": (0.0, 1.0),
    "clip_score": (-1.0, 1.0),
}
DROP, RECAPTION = "drop", "recaption"


@dataclass
class Rule:
    # YAML reads a bare ``off`` as false; that is accepted as "off".
    mode: Mode | bool = "absolute"
    value: float = 0.5

    def __post_init__(self) -> None:
        if self.mode is False:
            self.mode = "off"
        elif self.mode is True:
            raise ValueError("a rule's mode must be off, absolute, quantile or top_fraction")
        if self.mode in ("quantile", "top_fraction") and not 0.0 <= self.value <= 1.0:
            raise ValueError(f"a {self.mode} rule needs a value in [0, 1], got {self.value}")


@dataclass
class DecideConfig:
    drop: Rule = field(default_factory=lambda: Rule("absolute", 0.5))  # on certainty
    drop_clip: Rule = field(default_factory=lambda: Rule("off", 0.0))  # on clip_score
    recaption: Rule = field(default_factory=lambda: Rule("absolute", 0.5))  # on imbalance
    histogram_bins: int = 1 << 16

    def __post_init__(self) -> None:
        if self.histogram_bins < 16:
            raise ValueError("decide.histogram_bins must be >= 16")

    def needs_quantiles(self) -> bool:
        return any(r.mode in ("quantile", "top_fraction") for r in self.rules().values())

    def rules(self) -> dict[str, Rule]:
        return {"certainty": self.drop, "clip_score": self.drop_clip, "imbalance": self.recaption}


class ScoreHistograms(beam.CombineFn):
    """Per-score fixed-bin histograms; merging is addition, so order never matters."""

    def __init__(self, bins: int) -> None:
        self.bins = bins

    def create_accumulator(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(self.bins, dtype=np.int64) for name in SCORE_RANGES}

    def add_input(self, acc, row):
        for name, (lo, hi) in SCORE_RANGES.items():
            acc[name][_bin(row[name], lo, hi, self.bins)] += 1
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            for name in out:
                out[name] += acc[name]
        return out

    def extract_output(self, acc):
        return acc


def _bin(value: float, lo: float, hi: float, bins: int) -> int:
    return int(min(bins - 1, max(0, (value - lo) / (hi - lo) * bins)))


def histogram_quantile(hist: np.ndarray, q: float, lo: float, hi: float) -> float:
    """The lower edge of the bin holding the q-quantile (rows below it: at most q of all)."""
    total = int(hist.sum())
    if total == 0:
        return lo
    target = q * total
    cum = np.cumsum(hist)
    # Bins [0, index) hold at most q of the rows; the threshold is bin index's lower edge.
    index = min(int(np.searchsorted(cum, target, side="right")), len(hist))
    return lo + (hi - lo) * index / len(hist)


def resolve_thresholds(cfg: DecideConfig, hists: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """Each rule's numeric threshold (None when off); quantile rules need the histograms."""
    out: dict[str, Any] = {}
    for score, rule in cfg.rules().items():
        lo, hi = SCORE_RANGES[score]
        if rule.mode == "off":
            out[score] = None
        elif rule.mode == "absolute":
            out[score] = float(rule.value)
        else:
            if hists is None:
                raise ValueError("quantile thresholds need the score histograms")
            # quantile q: drop below / recaption above the q-quantile; top_fraction f: keep
            # (drop rules) or recaption (imbalance) about the top f, i.e. the (1 - f)-quantile.
            q = rule.value if rule.mode == "quantile" else 1.0 - rule.value
            out[score] = histogram_quantile(hists[score], q, lo, hi)
    out["_rows"] = None if hists is None else int(hists["certainty"].sum())
    return out


def decide(row: dict[str, Any], thresholds: dict[str, Any]) -> tuple[str, Reason]:
    """(decision, reason) for one scored row."""
    floor = thresholds.get("certainty")
    if floor is not None and row["certainty"] < floor:
        return DROP, Reason.LOW_CERTAINTY
    floor = thresholds.get("clip_score")
    if floor is not None and row["clip_score"] < floor:
        return DROP, Reason.LOW_CLIP_SCORE
    ceiling = thresholds.get("imbalance")
    if ceiling is not None and row["imbalance"] > ceiling:
        return RECAPTION, Reason.HIGH_IMBALANCE
    return "keep", Reason.PASSED


class _DecideFn(beam.DoFn):
    def process(self, element, thresholds) -> Iterator[Any]:
        _, row = element
        decision, reason = decide(row, thresholds)
        out = dict(row)
        out["decision"] = decision
        out["reason"] = reason.value
        out["caption_source"] = "original"
        if decision == DROP:
            yield beam.pvalue.TaggedOutput(DROP, out)
        elif decision == RECAPTION:
            yield beam.pvalue.TaggedOutput(RECAPTION, out)
        else:
            yield out


class Decide(beam.PTransform):
    """Scored (uid, row) -> tagged ``keep`` / ``drop`` / ``recaption`` rows and ``thresholds``."""

    def __init__(self, cfg: DecideConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def expand(self, scored):
        cfg = self.cfg
        pipeline = scored.pipeline
        if cfg.needs_quantiles():
            hists = (
                scored
                | "Values" >> beam.Values()
                | "Histograms" >> beam.CombineGlobally(ScoreHistograms(cfg.histogram_bins))
            )
            thresholds = hists | "Thresholds" >> beam.Map(lambda h: resolve_thresholds(cfg, h))
        else:
            thresholds = pipeline | "Thresholds" >> beam.Create([resolve_thresholds(cfg, None)])
        outputs = scored | "Decide" >> beam.ParDo(
            _DecideFn(), thresholds=beam.pvalue.AsSingleton(thresholds)
        ).with_outputs(DROP, RECAPTION, main="keep")
        return {
            "keep": outputs.keep,
            DROP: outputs[DROP],
            RECAPTION: outputs[RECAPTION],
            "thresholds": thresholds,
        }
