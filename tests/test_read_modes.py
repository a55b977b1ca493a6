"""The readers' index-only and selective modes against a full read, on the bad-input corpus.

``capgap curate``'s index pass (``ReadRecords(index_only=True)``) and bank pass
(``ReadRecords(select=...)``) must see exactly what the main pass's full read sees:
the same (uid, ref) for every record, bad rows and shards included, or duplicates and
bank candidates would be decided on different uids than the rows that carry them.

    .venv/bin/python -m pytest -q tests/test_read_modes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bad_inputs  # noqa: E402

from capgap.transforms.readers import ReadRecords, record_ref  # noqa: E402
from capgap.transforms.readers.record import selection  # noqa: E402


def _differences(left, right):
    """Elements whose count differs between two PCollections, as (element, left n, right n);
    elements are keyed by their repr (records hold dicts, which do not hash)."""

    def keyed(name):
        return name >> beam.Map(lambda x: (repr(x), x))

    return (
        {"left": left | keyed("KeyLeft"), "right": right | keyed("KeyRight")}
        | "Join" >> beam.CoGroupByKey()
        | "Counts" >> beam.Map(lambda kv: (kv[0], len(kv[1]["left"]), len(kv[1]["right"])))
        | "Differ" >> beam.Filter(lambda t: t[1] != t[2])
    )


def _non_empty(counts: list[int]) -> None:
    if not counts or counts[0] == 0:
        raise BeamAssertException("no records: the test would compare nothing")


def _is_picked(ref) -> bool:
    return ref[1] % 2 == 0  # every other row of each shard; shard-level errors (-1) too


@pytest.fixture(scope="module", params=bad_inputs.READERS)
def plans(request, tmp_path_factory):
    corpus = bad_inputs.build(request.param, tmp_path_factory.mktemp(f"modes-{request.param}"))
    return corpus.plans()


def test_index_only_read_gives_every_record_its_uid_and_ref(plans):
    for plan in plans:
        with TestPipeline() as p:
            full = p | "Full" >> ReadRecords(plan)
            refs = full | "Refs" >> beam.Map(lambda kv: (kv[0], record_ref(kv[1])))
            index = p | "Index" >> ReadRecords(plan, index_only=True) | beam.FlatMap(list)
            assert_that(_differences(refs, index), equal_to([]))
            n = refs | beam.combiners.Count.Globally()
            assert_that(n, _non_empty, label="Rows")


def test_selective_read_returns_exactly_the_selected_records(plans):
    for plan in plans:
        with TestPipeline() as p:
            full = p | "Full" >> ReadRecords(plan)
            # {uid: ref} keeps one ref per uid (of a duplicate uid, whichever came last).
            select = (
                full
                | "Picked" >> beam.Filter(lambda kv: _is_picked(record_ref(kv[1])))
                | "ToRef" >> beam.Map(lambda kv: (kv[0], record_ref(kv[1])))
                | "ToDict" >> beam.combiners.ToDict()
                | "AndNoRow" >> beam.Map(lambda d: {**d, "no-such-row": ("no-such-shard", 0)})
            )
            expected = full | "Expected" >> beam.Filter(
                lambda kv, refs: record_ref(kv[1]) in {tuple(r) for r in refs.values()},
                refs=beam.pvalue.AsSingleton(select),
            )
            chosen = p | "Selective" >> ReadRecords(plan, select=select)
            assert_that(_differences(expected, chosen), equal_to([]))
            n = expected | beam.combiners.Count.Globally()
            assert_that(n, _non_empty, label="Rows")


def test_an_unreadable_row_group_keeps_its_uid_when_the_uid_column_reads(tmp_path):
    corpus = bad_inputs.build("parquet", tmp_path)
    plan = next(p for p in corpus.plans() if any("row_groups" in f[0] for f in p.files))
    with TestPipeline() as p:
        records = p | ReadRecords(plan)
        bad = (
            records
            | beam.Filter(lambda kv: record_ref(kv[1]) == ("row_groups.parquet", 1))
            | beam.Map(lambda kv: (kv[0], kv[1]["error"][0]))
        )
        # Its uid column, not the derived "row_groups.parquet#1".
        assert_that(bad, equal_to([("rg-1", "record_unreadable")]))


def test_selection_groups_refs_by_source():
    assert selection(None) is None
    assert selection({"a": ("s", 1), "b": ["s", 3], "c": ("t", 0)}) == {
        "s": frozenset({1, 3}),
        "t": frozenset({0}),
    }
