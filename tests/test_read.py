"""Readers: Parquet (bytes and paths), WebDataset tar, HF datasets on disk, CSV/TSV, bad shards.

.venv/bin/python -m pytest -q tests/test_read.py
"""

from __future__ import annotations

import io
import json
import tarfile

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from capgap.transforms.readers import ReadConfig, ReadRecords, discover
from capgap.transforms.readers.discover import pattern_base


def png(seed: int = 0, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def summary(kv):
    """(uid, caption text, has image bytes, image path, error reason) of one record."""
    uid, r = kv
    caption = r["caption"].decode() if isinstance(r["caption"], bytes) else r["caption"]
    return (uid, caption, r["image"] is not None, r["image_path"], (r["error"] or [None])[0])


def read(pattern: str, cfg: ReadConfig | None = None, expected=None, columns=None):
    plan = discover(cfg or ReadConfig(), pattern)
    with TestPipeline() as p:
        records = p | ReadRecords(plan)
        assert_that(records | beam.Map(summary), equal_to(expected), label="records")
        if columns is not None:
            assert_that(
                records | "Cols" >> beam.Map(lambda kv: (kv[0], kv[1]["columns"])),
                equal_to(columns),
                label="columns",
            )
    return plan


def test_pattern_base():
    assert pattern_base("/a/b/*.parquet") == "/a/b"
    assert pattern_base("gs://x/y/part-*") == "gs://x/y"
    assert pattern_base("/a/b/file.csv") == "/a/b"


def test_parquet_bytes_with_uid_and_passthrough(tmp_path):
    for shard in range(2):
        table = pa.table(
            {
                "uid": [f"u{shard}{i}" for i in range(3)],
                "image": [png(i) for i in range(3)],
                "caption": [f"cap {shard} {i}" for i in range(3)],
                "k": pa.array([1, 2, 3], pa.int8()),
                "width": [20, 20, 20],  # a reserved name: kept as input_width
            }
        )
        pq.write_table(table, tmp_path / f"part-{shard}.parquet", row_group_size=2)
    expected = [(f"u{s}{i}", f"cap {s} {i}", True, None, None) for s in range(2) for i in range(3)]
    columns = [(f"u{s}{i}", {"k": i + 1, "input_width": 20}) for s in range(2) for i in range(3)]
    plan = read(str(tmp_path / "*.parquet"), expected=expected, columns=columns)
    assert plan.format == "parquet" and plan.passthrough.names == ["k", "input_width"]
    assert len(plan.fingerprint()) == 64


def test_parquet_paths_without_uid_derive_stable_uids(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(2):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
    pq.write_table(
        pa.table({"image_path": ["img/0.png", "img/1.png"], "text": ["a", "b"]}),
        tmp_path / "meta.parquet",
    )
    read(
        str(tmp_path / "*.parquet"),
        expected=[
            ("meta.parquet#0", "a", False, "img/0.png", None),
            ("meta.parquet#1", "b", False, "img/1.png", None),
        ],
    )


def test_parquet_bad_shards_become_error_records(tmp_path):
    good = pa.table({"uid": ["g"], "image": [png()], "caption": ["ok"]})
    pq.write_table(good, tmp_path / "a-good.parquet")
    (tmp_path / "b-garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"uid": ["m"], "image": [png()]}), tmp_path / "c-nocaption.parquet")
    pq.write_table(
        pa.table({"uid": ["t"], "image": [png()], "caption": [7]}), tmp_path / "d-intcap.parquet"
    )
    read(
        str(tmp_path / "*.parquet"),
        expected=[
            ("g", "ok", True, None, None),
            ("b-garbage.parquet#shard", None, False, None, "shard_unreadable"),
            ("m", None, False, None, "column_missing"),
            ("t", None, False, None, "column_type_invalid"),
        ],
    )


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "000000001.jpg", png(1))
        _add(tar, "000000001.txt", b"a red circle")
        _add(tar, "000000001.json", json.dumps({"key": "000000001", "url": "http://x"}).encode())
        _add(tar, "000000002.png", png(2))
        _add(tar, "000000002.json", json.dumps({"caption": "from json"}).encode())
        _add(tar, "000000003.txt", b"no image")
        _add(tar, "000000004.webp", png(4))
        _add(tar, "000000004.txt", b"bad json")
        _add(tar, "000000004.json", b"{not json")
    read(
        str(tmp_path / "*.tar"),
        expected=[
            ("000000001", "a red circle", True, None, None),
            ("000000002", "from json", True, None, None),
            ("000000003", "no image", False, None, None),
            ("000000004", "bad json", True, None, "metadata_invalid"),
        ],
    )


def test_truncated_tar_reports_the_tail(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(3):
            _add(tar, f"k{i}.png", png(i, size=64))
            _add(tar, f"k{i}.txt", f"cap {i}".encode())
    data = buffer.getvalue()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tar").write_bytes(b"\x00\x01garbage" * 10)
    plan = discover(ReadConfig(), str(tmp_path / "*.tar"))
    with TestPipeline() as p:
        records = p | ReadRecords(plan) | beam.Map(summary)
        errors = records | beam.Filter(lambda s: s[4] is not None) | beam.Map(lambda s: s[4])
        good = records | "Good" >> beam.Filter(lambda s: s[4] is None) | beam.Map(lambda s: s[0])
        assert_that(good, equal_to(["k0"]), label="good")
        assert_that(
            errors,
            equal_to(["record_unreadable", "shard_truncated", "shard_unreadable"]),
            label="errors",
        )


def test_hf_dataset_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": png(i), "path": None} for i in range(3)],
            "text": ["x", "y", "z"],
            "label": [0, 1, 2],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "text": datasets.Value("string"),
                "label": datasets.Value("int64"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    plan = read(
        str(tmp_path / "hf"),
        ReadConfig(hf_rows_per_task=2),
        expected=[(f"hf#{i}", c, True, None, None) for i, c in enumerate("xyz")],
        columns=[(f"hf#{i}", {"label": i}) for i in range(3)],
    )
    assert plan.format == "hf" and plan.hf_rows == 3


@pytest.mark.parametrize("suffix,delim", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv(tmp_path, suffix, delim):
    lines = [
        delim.join(["image_path", "caption", "extra"]),
        delim.join(["a.png", "a cat", "1"]),
        delim.join(["b.png", '"quoted, caption"' if delim == "," else "quoted, caption", "2"]),
        delim.join(["c.png", "too", "many", "fields"]),
        "",
        delim.join(["d.png", "", "4"]),
    ]
    (tmp_path / f"list.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    src = f"list.{suffix}"
    read(
        str(tmp_path / f"*.{suffix}"),
        expected=[
            (f"{src}#0", "a cat", False, "a.png", None),
            (f"{src}#1", "quoted, caption", False, "b.png", None),
            (f"{src}#2", "too", False, "c.png", "record_malformed"),
            (f"{src}#3", "", False, "d.png", None),
        ],
        columns=[(f"{src}#{i}", {"extra": e}) for i, e in enumerate(["1", "2", "many", "4"])],
    )


def test_csv_non_utf8_caption_survives_to_decode(tmp_path):
    (tmp_path / "l.csv").write_bytes(b"image_path,caption\na.png,caf\xe9\n")
    plan = discover(ReadConfig(), str(tmp_path / "*.csv"))
    with TestPipeline() as p:
        out = p | ReadRecords(plan) | beam.Map(lambda kv: kv[1]["caption"])
        assert_that(out, equal_to([b"caf\xe9"]))  # raw bytes: decode says caption_not_utf8


def test_discover_errors(tmp_path):
    with pytest.raises(ValueError, match="matched no files"):
        discover(ReadConfig(), str(tmp_path / "*.parquet"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ValueError, match="format"):
        discover(ReadConfig(), str(tmp_path / "*.bin"))


def test_csv_with_a_byte_order_mark_and_crlf(tmp_path):
    """ "CSV UTF-8" as spreadsheets save it: a BOM before the first header, CRLF line ends."""
    data = "uid,image_path,caption\r\nu1,a.png,a cat\r\nu2,b.png,a dog\r\n".encode("utf-8-sig")
    (tmp_path / "sheet.csv").write_bytes(data)
    plan = discover(ReadConfig(), str(tmp_path / "*.csv"))
    assert plan.uid_column == "uid"
    with TestPipeline() as p:
        out = p | ReadRecords(plan) | beam.Map(lambda kv: (kv[0], kv[1]["caption"]))
        assert_that(out, equal_to([("u1", "a cat"), ("u2", "a dog")]))


def test_dictionary_encoded_columns_read_as_their_values(tmp_path):
    """pandas writes categorical columns dictionary-encoded."""
    table = pa.table(
        {
            "uid": pa.array(["a", "b", "c"]).dictionary_encode(),
            "image": [b"x", b"y", b"z"],
            "caption": pa.array(["a star", "a star", "a circle"]).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "cat.parquet")
    plan = discover(ReadConfig(), str(tmp_path / "*.parquet"))
    with TestPipeline() as p:
        out = p | ReadRecords(plan) | beam.Map(lambda kv: (kv[0], kv[1]["caption"], kv[1]["error"]))
        assert_that(
            out, equal_to([("a", "a star", None), ("b", "a star", None), ("c", "a circle", None)])
        )
