"""Determinism of ``capgap curate``: same input, config and seed -> same output rows.

The bad-input corpus (Parquet: valid rows, odd images and every kind of error) is
curated with the tiny random-init CLIP (seeded) and a quantile policy twice: the
shared reference run on DirectRunner ``in_memory`` and a run on ``multi_processing``
with two workers. Every output row (curated, rejected, errors) must match by uid,
column by column; scores are compared to 1e-5 because the model embeds different
batches on different runners. A second ``in_memory`` run over the same input is
compared with the reference in ``tests/test_interrupted.py`` (the restart after a
kill), which keeps the suite short. Shard assignment is checked on the sink itself.

    .venv/bin/python -m pytest -q tests/test_determinism.py
"""

from __future__ import annotations

import apache_beam as beam
import bad_inputs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from capgap.pipeline import curate
from capgap.transforms.decode import DecodeConfig, decode_image
from capgap.transforms.reasons import RecordError
from capgap.transforms.write import WriteParquet

READER = "parquet"
FLOAT_TOLERANCE = bad_inputs.FLOAT_TOLERANCE
#: Columns allowed to differ between runs (none: error messages carry no reprs either).
VOLATILE: frozenset[str] = frozenset()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return bad_inputs.reference_build(tmp_path_factory.getbasetemp(), READER)


def _rerun(corpus, tmp_path_factory, name: str, *beam_flags: str) -> bad_inputs.BuildOutput:
    output = tmp_path_factory.mktemp(name) / "output"
    manifest = curate.run(bad_inputs.curate_argv(corpus.patterns[0], output, *beam_flags))
    built = bad_inputs.read_build(output)
    built.metrics = manifest["metrics"]
    return built


@pytest.fixture(scope="module")
def multi_processing(reference, tmp_path_factory):
    return _rerun(
        reference[0],
        tmp_path_factory,
        "det_multi",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    )


def _check_same_build(a: bad_inputs.BuildOutput, b: bad_inputs.BuildOutput) -> None:
    problems = bad_inputs.build_differences(a, b, skip=VOLATILE)
    assert not problems, "\n".join(problems[:30])
    assert a.manifest["counts"] == b.manifest["counts"]
    assert a.manifest["input"]["fingerprint"] == b.manifest["input"]["fingerprint"]
    assert a.manifest["models"]["clip"] == b.manifest["models"]["clip"]
    assert {k: v for k, v in a.manifest["thresholds"].items()} == pytest.approx(
        b.manifest["thresholds"], abs=FLOAT_TOLERANCE
    )
    assert a.manifest["bank"] == b.manifest["bank"]
    for folder in ("curated", "rejected", "errors"):
        assert a.files.get(folder) == b.files.get(folder), folder
    moved = {k: (v, b.placement.get(k)) for k, v in a.placement.items() if b.placement.get(k) != v}
    assert not moved, f"rows in a different shard: {moved}"
    assert not a.stray and not b.stray


def test_reference_run_uses_every_outcome(reference):
    """The comparison is not vacuous: rows were kept, recaption-marked, rejected and errored."""
    _, built = reference
    reasons = {row["reason"] for rows in built.rows.values() for row in rows}
    assert {"passed", "high_imbalance", "low_certainty"} <= reasons
    assert len(built.rows["errors"]) >= 20


def test_in_memory_and_multi_processing_give_the_same_rows(reference, multi_processing):
    _check_same_build(reference[1], multi_processing)


def test_same_decisions_exactly(reference, multi_processing):
    """Decisions and reasons never depend on the runner (not only up to a tolerance)."""
    for other in (multi_processing,):
        a, b = bad_inputs.rows_by_key(reference[1]), bad_inputs.rows_by_key(other)
        assert {k: (r.get("decision"), r["reason"]) for k, r in a.items()} == {
            k: (r.get("decision"), r["reason"]) for k, r in b.items()
        }


def test_error_messages_are_deterministic():
    """No object reprs (memory addresses) in messages: errors/ rows must repeat exactly."""
    with pytest.raises(RecordError) as info:
        decode_image(bad_inputs.random_bytes(), DecodeConfig())
    assert " at 0x" not in info.value.message, info.value.message


def test_shard_assignment_is_deterministic(tmp_path):
    """Six writes of the same rows in one pipeline must put every uid in the same shard."""
    schema = pa.schema([pa.field("uid", pa.string()), pa.field("reason", pa.string())])
    rows = [{"uid": f"u{i:03d}", "reason": "passed"} for i in range(64)]
    p = TestPipeline()
    source = p | beam.Create(rows)
    for copy in range(6):
        _ = source | f"Write{copy}" >> WriteParquet(
            str(tmp_path / f"copy{copy}"), "curated", schema, 4
        )
    p.run().wait_until_finish()
    assignments = []
    for copy in range(6):
        shard_of = {}
        for part in sorted((tmp_path / f"copy{copy}" / "curated").glob("part-*.parquet")):
            for uid in pq.read_table(part).column("uid").to_pylist():
                shard_of[uid] = part.name
        assert len(shard_of) == len(rows)
        assignments.append(shard_of)
    assert all(a == assignments[0] for a in assignments[1:])


def test_beam_runner_flag_is_not_taken_for_a_preset(tmp_path):
    cfg, options = curate.parse(
        ["--input", str(tmp_path / "*.parquet"), "--runner", "DirectRunner"]
    )
    assert options.get_all_options()["runner"] == "DirectRunner"


def test_policy_mode_off_from_the_command_line(tmp_path):
    """``--set decide.drop.mode=off`` means the mode 'off' (YAML would read it as false)."""
    cfg, _ = curate.parse(["--input", str(tmp_path / "*.parquet"), "--set", "decide.drop.mode=off"])
    assert cfg.decide.drop.mode == "off"
