"""The Parquet sinks: rows -> Arrow row groups -> ``WriteToParquetBatched`` files.

.venv/bin/python -m pytest -q tests/test_write.py
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from capgap.transforms.write import RowsToArrowFn, WriteParquet, record_batch

SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("label", pa.int64()),  # a passthrough column: in row["columns"]
        pa.field("note", pa.string()),  # in neither: None
    ]
)


def rows(n: int) -> list[dict]:
    return [{"uid": f"u{i}", "score": i / 2, "columns": {"label": i * 10}} for i in range(n)]


def test_record_batch_takes_row_keys_then_passthrough_columns():
    batch = record_batch(rows(3) + [{"uid": "x", "score": None, "label": 7}], SCHEMA)
    assert batch.schema == SCHEMA
    assert batch.to_pydict() == {
        "uid": ["u0", "u1", "u2", "x"],
        "score": [0.0, 0.5, 1.0, None],
        "label": [0, 10, 20, 7],
        "note": [None] * 4,
    }


def test_rows_to_arrow_emits_a_table_per_row_group_and_loses_no_row():
    # row_group_bytes=1: every converted batch of 4 rows closes a row group.
    with TestPipeline() as p:
        tables = (
            p
            | beam.Create(rows(10), reshuffle=False)
            | beam.ParDo(RowsToArrowFn(SCHEMA, batch_rows=4, row_group_bytes=1))
        )
        sizes = tables | "Sizes" >> beam.Map(lambda t: t.num_rows)
        uids = tables | "Uids" >> beam.FlatMap(lambda t: t.column("uid").to_pylist())
        assert_that(sizes, equal_to([4, 4, 2]), label="Sizes")
        assert_that(uids, equal_to([f"u{i}" for i in range(10)]), label="AllRows")


def test_write_parquet_writes_one_row_group_per_64_mib(tmp_path):
    with TestPipeline() as p:
        _ = p | beam.Create(rows(600)) | WriteParquet(str(tmp_path), "curated", SCHEMA, 0)
    files = sorted((tmp_path / "curated").glob("part-*.parquet"))
    assert files
    tables = [pq.read_table(f) for f in files]
    assert sum(t.num_rows for t in tables) == 600
    # Not one row group per 256-row conversion batch: small row groups slow every reader.
    assert all(pq.ParquetFile(f).num_row_groups == 1 for f in files)
    labels = sorted(v for t in tables for v in t.column("label").to_pylist())
    assert labels == [i * 10 for i in range(600)]
