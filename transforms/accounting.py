"""Counting where every record went: Beam counters and the manifest's exact counts.

:class:`CountOutcomes` takes the three final PCollections (curated, rejected,
errors rows), bumps ``Metrics.counter("capgap", "<outcome>")`` and
``"<outcome>.<reason>"`` per row (visible live in the runner's UI and printed at
the end of ``capgap curate``), and returns a single dict of exact counts for the
manifest. The readers count ``rows_in``; ``rows_in == curated + rejected +
errors`` is the invariant of a build.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from capgap.transforms.reasons import Outcome

NAMESPACE = "capgap"


class _CountFn(beam.DoFn):
    """Bumps the live counters of one outcome (the exact counts come from :class:`_KeyCounts`)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = Outcome(outcome).value
        self._counters: dict[str, Any] = {}

    def _inc(self, name: str) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
        counter.inc()

    def process(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._inc(self.outcome)
        self._inc(f"{self.outcome}.{row['reason']}")
        yield row


def outcome_keys(outcome: str, row: dict[str, Any]) -> list[str]:
    """The ``outcome|kind|value`` keys one row counts under."""
    keys = [f"{outcome}|reason|{row['reason']}"]
    if outcome == Outcome.CURATED.value:
        keys.append(f"{outcome}|decision|{row['decision']}")
        keys.append(f"{outcome}|caption_source|{row['caption_source']}")
    return keys


class _KeyCounts(beam.CombineFn):
    """Rows of one outcome -> {key: rows}. Combined where the rows are (no row is shuffled)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = Outcome(outcome).value

    def create_accumulator(self) -> Counter:
        return Counter()

    def add_input(self, acc: Counter, row: dict[str, Any]) -> Counter:
        acc.update(outcome_keys(self.outcome, row))
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


def _merge_counts(per_outcome: list[dict[str, int]]) -> dict[str, Any]:
    return counts_from_pairs([pair for counts in per_outcome for pair in counts.items()])


class CountOutcomes(beam.PTransform):
    """{outcome: rows} -> a single counts dict (see :func:`counts_from_pairs`).

    Each outcome's rows are counted where they are (a combine, lifted into the stage that
    makes them); only the three small dicts of counts meet.
    """

    def expand(self, branches: dict[str, Any]):
        per_outcome = [
            branches[o.value]
            | f"Counters{o.value.title()}" >> beam.ParDo(_CountFn(o))
            | f"Count{o.value.title()}" >> beam.CombineGlobally(_KeyCounts(o))
            for o in Outcome
        ]
        return (
            per_outcome
            | "AllOutcomes" >> beam.Flatten()
            | "ToList" >> beam.combiners.ToList()
            | "AsCounts" >> beam.Map(_merge_counts)
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
