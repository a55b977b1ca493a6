"""The sinks: rows -> Arrow row groups -> ``WriteToParquetBatched`` files; WebDataset tars.

.venv/bin/python -m pytest -q tests/test_write.py
"""

from __future__ import annotations

import json
import os
import tarfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from capgap.transforms.schema import IMAGE_TYPE
from capgap.transforms.wds_write import WriteWebDataset, sample_key
from capgap.transforms.write import (
    ArrowTableCoder,
    RowsToArrowFn,
    WriteConfig,
    WriteParquet,
    clear_outputs,
    record_batch,
)

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


def test_image_bytes_become_hf_image_structs():
    schema = pa.schema([pa.field("uid", pa.string()), pa.field("image", IMAGE_TYPE)])
    batch = record_batch([{"uid": "a", "image": b"\x89PNG"}, {"uid": "b", "image": None}], schema)
    assert batch.column("image").to_pylist() == [{"bytes": b"\x89PNG", "path": None}, None]


def test_write_config_needs_parquet_and_known_formats():
    assert WriteConfig().formats == ["parquet"]
    WriteConfig(formats=["parquet", "webdataset"])
    for formats in (["webdataset"], ["parquet", "tfrecord"]):
        with pytest.raises(ValueError):
            WriteConfig(formats=formats)


def _row(uid: str, fmt: str = "PNG") -> dict:
    return {
        "uid": uid,
        "image": f"bytes of {uid}".encode(),
        "image_format": fmt,
        "caption": f"caption of {uid}",
        "original_caption": "orig",
        "certainty": 0.5,
        "pixels": object(),  # never written
        "columns": {"label": 3},
    }


def test_webdataset_sink_writes_every_shard_index_and_row_once(tmp_path):
    uids = [f"s.{i}" for i in range(7)] + ["a/b.c", "x%2Ey"]
    with TestPipeline() as p:
        shards = (
            p | beam.Create([_row(u) for u in uids]) | WriteWebDataset(str(tmp_path), num_shards=4)
        )
        assert_that(
            shards | beam.Map(lambda kv: kv[1]) | beam.CombineGlobally(sum),
            equal_to([len(uids)]),
        )
    names = sorted(os.listdir(tmp_path / "curated-wds"))
    assert names == [f"shard-{i:05d}.tar" for i in range(4)]  # an unbroken brace range
    members = []
    for name in names:
        with tarfile.open(tmp_path / "curated-wds" / name) as tar:
            for info in tar:
                members.append((info.name, tar.extractfile(info).read()))
    by_name = dict(members)
    assert len(members) == 3 * len(uids)
    for uid in uids:
        key = sample_key(uid)
        meta = json.loads(by_name[f"{key}.json"])
        assert meta["uid"] == uid and meta["label"] == 3 and "pixels" not in meta
        assert by_name[f"{key}.png"] == f"bytes of {uid}".encode()
        assert by_name[f"{key}.txt"].decode() == f"caption of {uid}"


def test_webdataset_shard_count_follows_the_row_count(tmp_path):
    with TestPipeline() as p:
        _ = (
            p
            | beam.Create([_row(f"u{i}", "JPEG") for i in range(10)])
            | WriteWebDataset(str(tmp_path), samples_per_shard=3)
        )
    assert len(os.listdir(tmp_path / "curated-wds")) == 4  # ceil(10 / 3)


def test_clear_outputs_removes_card_and_tar_shards(tmp_path):
    for name in ("curated", "curated-wds", "errors"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_bytes(b"")
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "keep.txt").write_text("not ours")
    clear_outputs(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_arrow_tables_cross_beam_as_ipc_streams_sized_without_encoding():
    schema = pa.schema([pa.field("uid", pa.string())], metadata={b"k": b"v"})
    table = pa.table({"uid": ["a", None, "c"]}, schema=schema)
    coder = beam.coders.registry.get_coder(pa.Table)
    assert isinstance(coder, ArrowTableCoder)
    assert coder.decode(coder.encode(table)).equals(table, check_metadata=True)
    assert coder.estimate_size(table) == table.nbytes
    p = beam.Pipeline()
    tables = p | beam.Create([{"uid": "a"}]) | beam.ParDo(RowsToArrowFn(schema))
    assert tables.element_type is pa.Table  # so the registered coder is the PCollection's
