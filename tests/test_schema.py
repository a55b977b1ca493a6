"""Every column a stage puts on a row is one ``transforms/schema.py`` writes, and every
column written is put there by a stage; the reserved input names follow the schemas.

    .venv/bin/python -m pytest -q tests/test_schema.py
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that

from capgap.pipeline import curate
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms import recaption, schema
from capgap.transforms.reasons import Reason, Stage, error_row
from capgap.transforms.recaption import RecaptionConfig, finalize_row

SETS = ["score.bank_size=8", "model.min_batch_size=4", "model.max_batch_size=8"]


def test_reserved_columns_are_every_column_written():
    written = {f.name for f in [*schema.ROW_FIELDS, *schema.RECAPTION_FIELDS]}
    written |= set(schema.ERRORS_SCHEMA.names)
    assert written == schema.RESERVED_COLUMNS
    # the ones an earlier hand-kept list missed
    assert {"decode_notes", "image_num_bytes", "recaption_status", "recaption_error"} <= written


def test_error_rows_have_exactly_the_errors_columns():
    row = error_row({"uid": "u", "image": b"xx"}, Stage.DECODE, Reason.IMAGE_EMPTY, "E", "m")
    assert list(row) == schema.ERRORS_SCHEMA.names
    pa.RecordBatch.from_pylist([row], schema=schema.ERRORS_SCHEMA)


@pytest.mark.parametrize("error", [None, "RuntimeError: boom"])
@pytest.mark.parametrize("output_column", ["caption", "dense_caption"])
def test_every_column_the_recaption_stage_sets_is_written(error, output_column):
    row = {f.name: None for f in schema.ROW_FIELDS} | {"caption": "a star", "columns": {}}
    cfg = RecaptionConfig(output_column=output_column)
    out = finalize_row(row, "a small red star", "cap@0", cfg, None, error)
    written = set(schema.row_schema(pa.schema([]), schema.recaption_fields(output_column)).names)
    assert set(out) - {"columns"} == written
    documented = [recaption.STATUS_COLUMN, recaption.ERROR_COLUMN, recaption.GATE_NEW_COLUMN]
    assert set(documented) <= written


def _check_keys(allowed: set[str], required: set[str], what: str):
    def check(key_sets):
        assert key_sets, f"no {what} rows"
        for keys in map(set, key_sets):
            if not keys <= allowed:
                raise BeamAssertException(f"{what}: not written: {sorted(keys - allowed)}")
            if not required <= keys:
                raise BeamAssertException(f"{what}: never set: {sorted(required - keys)}")

    return check


def test_rows_reaching_each_sink_match_its_schema(tmp_path):
    split = SplitConfig(n=24, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(24)]
    rows.append(dict(rows[0], uid="bad", image=b"junk"))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "web.parquet")
    argv = ["--input", str(tmp_path / "*.parquet"), "--output", str(tmp_path / "out")]
    argv += [f"--set={s}" for s in [*SETS, "decide.drop.mode=quantile", "decide.drop.value=0.3"]]
    cfg, _ = curate.parse(argv)
    p = TestPipeline()
    built = curate.build(p, cfg)
    row_names = {f.name for f in schema.ROW_FIELDS}
    sinks = {
        "curated": (row_names | {f.name for f in schema.RECAPTION_FIELDS}, row_names),
        "rejected": (row_names, row_names),
        "errors": (set(schema.ERRORS_SCHEMA.names),) * 2,
    }
    for name, (allowed, required) in sinks.items():
        keys = (
            built[name]
            | f"{name}Keys" >> beam.Map(lambda row: tuple(sorted(set(row) - {"columns"})))
            | f"{name}Distinct" >> beam.Distinct()
        )
        assert_that(keys, _check_keys(allowed, required, name), label=f"{name}Check")
    p.run().wait_until_finish()


def test_hf_features_metadata_describes_every_column_datasets_can_hold():
    import json

    passthrough = pa.schema([("labels", pa.map_(pa.string(), pa.int64())), ("k", pa.int8())])
    out = schema.row_schema(passthrough, schema.recaption_fields())
    features = json.loads(out.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert "k" in features and "labels" not in features  # no datasets feature for a map
    assert out.field("image").type == schema.IMAGE_TYPE and all(f.nullable for f in out)
