"""Counting where every record went: Beam counters and the manifest's exact counts.

:class:`CountOutcomes` takes the three final PCollections (curated, rejected,
errors rows), bumps ``Metrics.counter("capgap", "<outcome>")`` and
``"<outcome>.<reason>"`` (visible live in the runner's UI and printed at the end of
``capgap curate``), and returns a single dict of exact counts for the manifest. The readers count ``rows_in``; ``rows_in == curated + rejected +
errors`` is the invariant of a build. Rows are tallied per bundle (one dict increment a
row), so the live counters move once per bundle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.transforms.window import GlobalWindows

from capgap.transforms.reasons import Outcome

NAMESPACE = "capgap"


def outcome_keys(outcome: str, row: dict[str, Any]) -> list[str]:
    """The ``outcome|kind|value`` keys one row counts under."""
    keys = [f"{outcome}|reason|{row['reason']}"]
    if outcome == Outcome.CURATED.value:
        keys.append(f"{outcome}|decision|{row['decision']}")
        keys.append(f"{outcome}|caption_source|{row['caption_source']}")
    return keys


class _TallyFn(beam.DoFn):
    """Rows of one outcome -> one ``{key: rows}`` dict per bundle (:func:`outcome_keys`), and
    the live counters ``<outcome>`` and ``<outcome>.<reason>`` bumped once per bundle.

    A row costs one dict increment here: the keys are built, and the counters bumped, per
    distinct (reason, decision, caption source) of the bundle, not per row.
    """

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = Outcome(outcome).value
        self._detailed = self.outcome == Outcome.CURATED.value

    def start_bundle(self) -> None:
        self._tally: Counter = Counter()

    def process(self, row: dict[str, Any]) -> Iterator[dict[str, int]]:
        if self._detailed:
            self._tally[row["reason"], row["decision"], row["caption_source"]] += 1
        else:
            self._tally[row["reason"]] += 1
        return ()

    def finish_bundle(self) -> Iterator[Any]:
        if not self._tally:
            return
        counts: Counter = Counter()
        by_reason: Counter = Counter()
        for tally_key, n in self._tally.items():
            if self._detailed:
                reason, decision, source = tally_key
                row = {"reason": reason, "decision": decision, "caption_source": source}
            else:
                reason, row = tally_key, {"reason": tally_key}
            by_reason[reason] += n
            for key in outcome_keys(self.outcome, row):
                counts[key] += n
        for reason, n in by_reason.items():
            Metrics.counter(NAMESPACE, f"{self.outcome}.{reason}").inc(n)
        Metrics.counter(NAMESPACE, self.outcome).inc(sum(by_reason.values()))
        self._tally = Counter()
        yield GlobalWindows.windowed_value_at_end_of_window(dict(counts))


class _SumCounts(beam.CombineFn):
    """Per-bundle ``{key: rows}`` dicts -> their sum."""

    def create_accumulator(self) -> Counter:
        return Counter()

    def add_input(self, acc: Counter, counts: dict[str, int]) -> Counter:
        acc.update(counts)
        return acc

    def merge_accumulators(self, accs) -> Counter:
        total: Counter = Counter()
        for acc in accs:
            total.update(acc)
        return total

    def extract_output(self, acc: Counter) -> dict[str, int]:
        return dict(acc)


def counts_from_pairs(pairs: list[tuple[str, int]]) -> dict[str, Any]:
    """{"rows_in", "curated", "rejected", "errors", "by_reason": {...}, ...} from key counts."""
    out: dict[str, Any] = {o.value: 0 for o in Outcome}
    out["by_reason"] = {o.value: {} for o in Outcome}
    out["curated_by_decision"] = {}
    out["curated_by_caption_source"] = {}
    for key, n in sorted(pairs):
        outcome, kind, value = key.split("|", 2)
        if kind == "reason":
            out[outcome] += n
            out["by_reason"][outcome][value] = n
        else:
            out[f"curated_by_{kind}"][value] = n
    out["rows_in"] = sum(out[o.value] for o in Outcome)
    return out


class CountOutcomes(beam.PTransform):
    """{outcome: rows} -> a single counts dict (see :func:`counts_from_pairs`).

    Each outcome's rows are tallied where they are, one dict per bundle (no row is
    shuffled, and a row crosses one step); only those small dicts meet.
    """

    def expand(self, branches: dict[str, Any]):
        per_outcome = [
            branches[o.value] | f"Tally{o.value.title()}" >> beam.ParDo(_TallyFn(o))
            for o in Outcome
        ]
        return (
            per_outcome
            | "AllOutcomes" >> beam.Flatten()
            | "Sum" >> beam.CombineGlobally(_SumCounts())
            | "AsCounts" >> beam.Map(lambda counts: counts_from_pairs(list(counts.items())))
        )


def counter_values(result: Any) -> dict[str, int]:
    """The ``capgap`` counters of a finished pipeline result (committed if known)."""
    values: dict[str, int] = {}
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + int(value or 0)
    return dict(sorted(values.items()))


def format_counters(values: dict[str, int]) -> str:
    width = max((len(k) for k in values), default=0)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in values.items())
