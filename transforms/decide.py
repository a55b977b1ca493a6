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

Quantiles come from a histogram combine whose 65,536 bins are the float32
values ordered by their top 16 bits (sign, exponent, 7 mantissa bits): every
power of two gets 128 bins, so the resolution is relative (< 0.8% of the value)
at every scale. A certainty spread over 1e-8 .. 1 resolves as well as one in
[0.4, 0.6], which equal-width bins over [0, 1] cannot do. Merging is addition,
so thresholds are identical on every runner and worker count, and a quantile
rule never drops or recaptions more than its share of rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import apache_beam as beam
import numpy as np

from capgap.transforms.reasons import Reason

Mode = Literal["off", "absolute", "quantile", "top_fraction"]
SCORES: tuple[str, ...] = ("certainty", "imbalance", "clip_score")
HISTOGRAM_BINS = 1 << 16
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

    def needs_quantiles(self) -> bool:
        return any(r.mode in ("quantile", "top_fraction") for r in self.rules().values())

    def rules(self) -> dict[str, Rule]:
        return {"certainty": self.drop, "clip_score": self.drop_clip, "imbalance": self.recaption}


class ScoreHistograms(beam.CombineFn):
    """Per-score histograms over float32-ordered bins; merging is addition, so order never matters."""

    def create_accumulator(self) -> dict[str, np.ndarray]:
        return {name: np.zeros(HISTOGRAM_BINS, dtype=np.int64) for name in SCORES}

    def add_input(self, acc, row):
        for name in SCORES:
            acc[name][score_bin(row[name])] += 1
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


_SIGN = np.uint32(0x80000000)
_NEG_INF = np.float32(-np.inf)


def score_bin(value: float) -> int:
    """The bin of ``value``: bins are ordered like the values, and a bin's lower edge is <= value.

    The float32 bit pattern, made monotone (flip every bit of a negative, set the sign bit of
    a positive), keeps its top 16 bits. ``value`` is first rounded down to float32 so that
    the comparison ``value < bin_lower_edge(b)`` in float64 agrees with the bin order.
    """
    if not np.isfinite(value):
        raise ValueError(f"scores must be finite to be binned, got {value!r}")
    as_f32 = np.float32(value) if value != 0.0 else np.float32(0.0)  # -0.0 == 0.0: one bin
    if as_f32 > value:
        as_f32 = np.nextafter(as_f32, _NEG_INF)
    bits = np.array(as_f32, dtype=np.float32).view(np.uint32)
    key = ~bits if bits & _SIGN else bits | _SIGN
    return int(key) >> 16


def bin_lower_edge(index: int) -> float:
    """The smallest float32 value in bin ``index`` (the inverse of :func:`score_bin`)."""
    key = np.uint32(index << 16)
    bits = key & ~_SIGN if key & _SIGN else ~key
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def histogram_quantile(hist: np.ndarray, q: float) -> float:
    """The lower edge of the bin holding the q-quantile (rows below it: at most q of all).

    Always finite (the manifest stores it as JSON): for q = 1 the edge just above the largest
    value, so every row is below it; for an empty histogram 0.0, which no row is below.
    """
    total = int(hist.sum())
    if total == 0:
        return 0.0
    cum = np.cumsum(hist)
    # Bins [0, index) hold at most q of the rows; the threshold is bin index's lower edge.
    index = int(np.searchsorted(cum, q * total, side="right"))
    if index >= len(hist):
        index = int(np.flatnonzero(hist)[-1]) + 1
    return bin_lower_edge(index)


def resolve_thresholds(cfg: DecideConfig, hists: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """Each rule's numeric threshold (None when off); quantile rules need the histograms."""
    out: dict[str, Any] = {}
    for score, rule in cfg.rules().items():
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
            out[score] = histogram_quantile(hists[score], q)
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


RECAPTION_DISABLED = "disabled"  # recaption_status of rows marked recaption when no stage runs


class _DecideFn(beam.DoFn):
    """Scored (uid, row) + thresholds side input -> the row, tagged by its decision."""

    def __init__(self, recaption_stage: bool) -> None:
        self.recaption_stage = recaption_stage

    def process(self, element, thresholds) -> Iterator[Any]:
        yield self.route(element[1], thresholds)

    def route(self, row: dict[str, Any], thresholds: dict[str, Any]) -> Any:
        decision, reason = decide(row, thresholds)
        out = dict(row)
        out["decision"] = decision
        out["reason"] = reason.value
        out["caption_source"] = "original"
        if decision == DROP:
            return beam.pvalue.TaggedOutput(DROP, out)
        if decision == RECAPTION and self.recaption_stage:
            return beam.pvalue.TaggedOutput(RECAPTION, out)
        out["recaption_status"] = RECAPTION_DISABLED if decision == RECAPTION else None
        return out


class _DecideFixedFn(_DecideFn):
    """:class:`_DecideFn` with thresholds known when the graph is built (no quantile rule):
    no side input, so Beam calls it through its plain per-element path (~3 us a row less
    than a DoFn with a side input)."""

    def __init__(self, recaption_stage: bool, thresholds: dict[str, Any]) -> None:
        super().__init__(recaption_stage)
        self.thresholds = thresholds

    def process(self, element) -> Iterator[Any]:
        yield self.route(element[1], self.thresholds)


class Decide(beam.PTransform):
    """Scored (uid, row) -> tagged ``keep`` / ``drop`` / ``recaption`` rows and ``thresholds``.

    ``recaption_stage=False`` (no recaption stage runs): rows marked recaption stay on
    ``keep``, with ``recaption_status`` "disabled" (kept rows: None), so the curated rows
    are one PCollection and need no Flatten (which DirectRunner materialises).
    """

    def __init__(self, cfg: DecideConfig, recaption_stage: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.recaption_stage = recaption_stage

    def expand(self, scored):
        cfg = self.cfg
        pipeline = scored.pipeline
        if cfg.needs_quantiles():
            hists = (
                scored
                | "Values" >> beam.Values()
                | "Histograms" >> beam.CombineGlobally(ScoreHistograms())
            )
            thresholds = hists | "Thresholds" >> beam.Map(lambda h: resolve_thresholds(cfg, h))
            decide_fn = beam.ParDo(
                _DecideFn(self.recaption_stage), thresholds=beam.pvalue.AsSingleton(thresholds)
            )
        else:
            fixed = resolve_thresholds(cfg, None)
            thresholds = pipeline | "Thresholds" >> beam.Create([fixed])
            decide_fn = beam.ParDo(_DecideFixedFn(self.recaption_stage, fixed))
        outputs = scored | "Decide" >> decide_fn.with_outputs(DROP, RECAPTION, main="keep")
        return {
            "keep": outputs.keep,
            DROP: outputs[DROP],
            RECAPTION: outputs[RECAPTION],
            "thresholds": thresholds,
        }
