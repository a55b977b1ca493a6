"""Inputs as real tools write them: folders (img2dataset, HF save_to_disk, plain), brace
patterns, derived uids next to real ones, HF DatasetDict splits, img2dataset's failed rows,
two image members for one tar key, Parquet page checksums.

Tars come from ``webdataset.ShardWriter``, HF folders from ``datasets``, Parquet from
pyarrow; the img2dataset folders follow its layout (``00000.tar`` + ``00000.parquet`` +
``00000_stats.json``); ``tools/img2dataset_check.py`` runs the real img2dataset.

    .venv/bin/python -m pytest -q tests/test_real_inputs.py
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from capgap.core.files import expand_braces, expand_paths, split_patterns
from capgap.transforms.dedup import DropDuplicateUids
from capgap.transforms.readers import ReadConfig, ReadRecords, discover
from capgap.transforms.schema import ERRORS


def jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _summary(kv):
    uid, r = kv
    error = r["error"] or (None, None, None)
    return uid, r["source"], r["source_index"], error[0], error[2]


def _collect(plan):
    """Every record of a full read, as _summary tuples (through a file: DoFns are copies)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "rows")
        with TestPipeline() as p:
            _ = (
                p
                | ReadRecords(plan)
                | beam.Map(lambda kv: json.dumps(_summary(kv)))
                | beam.io.WriteToText(prefix)
            )
        lines = [
            line
            for name in sorted(os.listdir(tmp))
            for line in Path(tmp, name).read_text().split("\n")
        ]
    return sorted((tuple(json.loads(line)) for line in lines if line), key=repr)


# --- an img2dataset-style folder ----------------------------------------------------------------

I2D_SCHEMA_COLUMNS = ("url", "caption", "key", "status", "error_message", "width", "height")


def img2dataset_folder(root: Path, mode: str, shards: int = 2, per_shard: int = 3) -> int:
    """A folder laid out as img2dataset writes it; the last row of each shard failed to
    download. Returns the number of downloaded rows."""
    import webdataset as wds

    root.mkdir(parents=True)
    downloaded = 0
    for shard in range(shards):
        name = f"{shard:05d}"
        meta = {c: [] for c in I2D_SCHEMA_COLUMNS}
        jpgs = []
        samples = []
        for i in range(per_shard):
            key = f"{shard:05d}{i:04d}"
            failed = i == per_shard - 1
            meta["url"].append(f"http://127.0.0.1/{key}.jpg")
            meta["caption"].append(f"photo {key}")
            meta["key"].append(key)
            meta["status"].append("failed_to_download" if failed else "success")
            meta["error_message"].append("HTTP Error 404: Not Found" if failed else None)
            meta["width"].append(None if failed else 24)
            meta["height"].append(None if failed else 24)
            jpgs.append(None if failed else jpeg(shard * 10 + i))
            if not failed:
                downloaded += 1
                record = {k: meta[k][-1] for k in I2D_SCHEMA_COLUMNS}
                samples.append(
                    {
                        "__key__": key,
                        "jpg": jpgs[-1],
                        "txt": meta["caption"][-1],
                        "json": json.dumps(record).encode(),
                    }
                )
        table = pa.table(meta)
        if mode == "parquet":
            table = table.append_column("jpg", pa.array(jpgs, pa.binary()))
        else:
            with wds.TarWriter(str(root / f"{name}.tar")) as sink:
                for sample in samples:
                    sink.write(sample)
        pq.write_table(table, root / f"{name}.parquet")
        (root / f"{name}_stats.json").write_text(json.dumps({"count": per_shard}))
    (root / "_SUCCESS").write_text("")
    (root / ".hidden.parquet").write_bytes(b"not parquet")
    return downloaded


@pytest.mark.parametrize("mode", ["webdataset", "parquet"])
@pytest.mark.parametrize("slash", ["", "/"])
@pytest.mark.parametrize("fmt", ["auto", "set"])
def test_img2dataset_folder_is_read_whole(tmp_path, mode, slash, fmt):
    folder = tmp_path / "i2d"
    downloaded = img2dataset_folder(folder, mode)
    cfg = ReadConfig(format=mode if fmt == "set" else "auto")
    plan = discover(cfg, str(folder) + slash)
    assert plan.format == mode
    assert [Path(p).name for p, _, _ in plan.files] == [f"0000{i}.{_ext(mode)}" for i in (0, 1)]
    assert "00000_stats.json" in plan.skipped and "_SUCCESS" in plan.skipped
    assert ".hidden.parquet" in plan.skipped
    if mode == "webdataset":  # the metadata Parquets are used for failed rows, not read twice
        assert [Path(meta).name for _, meta, _, _ in plan.sidecars] == [
            "00000.parquet",
            "00001.parquet",
        ]
    records = _collect(plan)
    ok = [r for r in records if r[3] is None]
    failed = [r for r in records if r[3] is not None]
    assert len(ok) == downloaded == 4
    assert {r[0] for r in ok} == {"000000000", "000000001", "000010000", "000010001"}
    assert [(r[0], r[3], r[4]) for r in failed] == [
        ("000000002", "source_failed", "failed_to_download: HTTP Error 404: Not Found"),
        ("000010002", "source_failed", "failed_to_download: HTTP Error 404: Not Found"),
    ]
    if mode == "webdataset":
        assert {r[1] for r in failed} == {"00000.parquet", "00001.parquet"}


def _ext(mode: str) -> str:
    return "tar" if mode == "webdataset" else "parquet"


def test_index_and_selective_reads_see_the_failed_rows_too(tmp_path):
    """capgap curate's index and bank passes see img2dataset's failed rows as the main pass."""
    from capgap.transforms.readers import record_ref

    img2dataset_folder(tmp_path / "i2d", "webdataset")
    plan = discover(ReadConfig(), str(tmp_path / "i2d"))
    full = [(r[0], (r[1], r[2])) for r in _collect(plan)]
    with TestPipeline() as p:
        index = p | "Index" >> ReadRecords(plan, index_only=True) | beam.FlatMap(list)
        assert_that(index | beam.Map(lambda kv: (kv[0], tuple(kv[1]))), equal_to(full))
        select = p | "Select" >> beam.Create([{"000010002": ("00001.parquet", 2)}])
        chosen = p | "Chosen" >> ReadRecords(plan, select=select)
        assert_that(
            chosen | beam.Map(lambda kv: (kv[0], record_ref(kv[1]), kv[1]["error"][0])),
            equal_to([("000010002", ("00001.parquet", 2), "source_failed")]),
            label="selected",
        )


def test_parquet_set_on_a_webdataset_folder_reads_the_parquets(tmp_path):
    """read.format=parquet is honoured: the tars are skipped, not read as broken Parquet."""
    folder = tmp_path / "i2d"
    img2dataset_folder(folder, "webdataset")
    plan = discover(ReadConfig(format="parquet"), str(folder))
    assert [Path(p).name for p, _, _ in plan.files] == ["00000.parquet", "00001.parquet"]
    assert "00000.tar" in plan.skipped and not plan.sidecars


def test_a_folder_of_other_files_only_says_so(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.json").write_text("{}")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    with pytest.raises(ValueError, match="no data files"):
        discover(ReadConfig(), str(tmp_path / "d"))


def test_plain_folder_of_csv_shards(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.csv").write_text(f"image_path,caption\na{i}.png,cap {i}\n")
    (folder / "README.md").write_text("# lists")
    plan = discover(ReadConfig(), str(folder))
    assert plan.format == "csv" and plan.skipped == ("README.md",)
    assert [r[0] for r in _collect(plan)] == ["part0.csv#0", "part1.csv#0"]


# --- brace patterns --------------------------------------------------------------------------


def test_brace_pattern_like_the_readme(tmp_path):
    import webdataset as wds

    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "%05d.tar"), maxcount=2) as sink:
        for i in range(6):
            sink.write({"__key__": f"k{i}", "jpg": jpeg(i), "txt": f"caption {i}"})
    assert sorted(p.name for p in shards.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    plan = discover(ReadConfig(), str(shards) + "/{00000..00001}.tar")
    assert plan.format == "webdataset" and len(plan.files) == 2
    assert [r[0] for r in _collect(plan)] == ["k0", "k1", "k2", "k3"]
    # braces and globs together; a source is named relative to the folder before the brace
    plan = discover(ReadConfig(), str(shards) + "/{00000,0000[12]}*")
    assert len(plan.files) == 3 and _collect(plan)[-1][1] == "00002.tar"
    with pytest.raises(ValueError, match="00003.tar"):
        discover(ReadConfig(), str(shards) + "/{00000..00003}.tar")


def test_expand_braces_and_paths(tmp_path):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert split_patterns("a/{x,y}.parquet,b") == ["a/{x,y}.parquet", "b"]
    for name in ("x.parquet", "y.parquet", "_tmp.parquet"):
        (tmp_path / name).write_bytes(b"")
    got = expand_paths(f"{tmp_path}/{{x,y}}.parquet")
    assert [p.name for p in got] == ["x.parquet", "y.parquet"]
    assert [p.name for p in expand_paths(str(tmp_path))] == ["x.parquet", "y.parquet"]
    with pytest.raises(FileNotFoundError, match="z.parquet"):
        expand_paths(f"{tmp_path}/{{x,z}}.parquet")


# --- derived uids never collide with real ones ---------------------------------------------------


def test_a_real_uid_equal_to_a_derived_one_is_not_a_duplicate(tmp_path):
    # a.parquet has a uid column whose value equals the uid derived for b.parquet's row 0
    pq.write_table(
        pa.table({"uid": ["b.parquet#0"], "image": [jpeg(0)], "caption": ["real"]}),
        tmp_path / "a.parquet",
    )
    pq.write_table(
        pa.table({"image": [jpeg(1), jpeg(2)], "caption": ["derived 0", "derived 1"]}),
        tmp_path / "b.parquet",
    )
    plan = discover(ReadConfig(), str(tmp_path / "*.parquet"))
    with TestPipeline() as p:
        unique = p | ReadRecords(plan) | DropDuplicateUids()
        assert_that(
            unique.ok | beam.Map(lambda kv: (kv[0], kv[1]["uid"], kv[1]["caption"])),
            equal_to(
                [
                    ("b.parquet#0", "b.parquet#0", "real"),
                    ("b.parquet#0#derived", "b.parquet#0#derived", "derived 0"),
                    ("b.parquet#1", "b.parquet#1", "derived 1"),
                ]
            ),
        )
        assert_that(unique[ERRORS], equal_to([]), label="no errors")


# --- HF DatasetDict -------------------------------------------------------------------------------


def _dataset_dict(path: Path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})

    def split(n, offset):
        return datasets.Dataset.from_dict(
            {
                "image": [{"bytes": jpeg(offset + i), "path": None} for i in range(n)],
                "text": [f"row {offset + i}" for i in range(n)],
            },
            features=features,
        )

    datasets.DatasetDict({"train": split(3, 0), "test": split(2, 100)}).save_to_disk(str(path))


def test_hf_dataset_dict_reads_every_split_and_fingerprints_the_data(tmp_path):
    _dataset_dict(tmp_path / "dd")
    plan = discover(ReadConfig(hf_rows_per_task=2), str(tmp_path / "dd"))
    assert dict(plan.hf_splits) == {"train": 3, "test": 2} and plan.hf_rows == 5
    got = _collect(plan)
    assert sorted((r[1], r[2]) for r in got) == [("dd/test", 0), ("dd/test", 1)] + [
        ("dd/train", i) for i in range(3)
    ]
    assert all(r[3] is None for r in got)
    only = discover(ReadConfig(hf_split="test"), str(tmp_path / "dd/"))
    assert only.hf_splits == (("test", 2),) and len(_collect(only)) == 2
    # The fingerprint covers the Arrow files: touching one changes it.
    before = plan.fingerprint()
    arrow = next((tmp_path / "dd" / "train").glob("*.arrow"))
    stat = arrow.stat()
    os.utime(arrow, (stat.st_atime, stat.st_mtime + 5))
    assert discover(ReadConfig(), str(tmp_path / "dd")).fingerprint() != before
    with pytest.raises(ValueError, match="no split 'val'"):
        discover(ReadConfig(hf_split="val"), str(tmp_path / "dd"))


# --- tar: two image members for one key --------------------------------------------------------


def test_two_image_members_for_one_key_are_recorded(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "jpg": jpeg(0), "png": jpeg(1), "txt": "which one"})
        sink.write({"__key__": "b", "jpg": jpeg(2), "txt": "fine"})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:  # the same member twice
        for name, data in (("c.jpg", jpeg(3)), ("c.jpg", jpeg(4)), ("c.txt", b"twice")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "t.tar").write_bytes(buffer.getvalue())
    got = _collect(discover(ReadConfig(), str(tmp_path / "*.tar")))
    assert [(r[0], r[3]) for r in got] == [
        ("a", "record_malformed"),
        ("b", None),
        ("c", "record_malformed"),
    ]
    assert "a.jpg, a.png" in got[0][4] and "appears twice" in got[2][4]


# --- Parquet page checksums ----------------------------------------------------------------------


def test_a_flipped_byte_in_a_checksummed_page_is_an_error_row(tmp_path):
    payload = bytes(range(256)) * 8
    table = pa.table({"uid": ["u0", "u1"], "image": [payload, b"x"], "caption": ["a", "b"]})
    path = tmp_path / "crc.parquet"
    pq.write_table(table, path, compression="NONE", write_page_checksum=True)
    data = bytearray(path.read_bytes())
    at = data.find(payload) + 100
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    # Without verification the flipped byte would come back as data:
    silent = pq.read_table(path, columns=["image"]).column(0)[0].as_py()
    assert silent != payload and len(silent) == len(payload)
    got = _collect(discover(ReadConfig(), str(path)))
    assert [(r[0], r[3]) for r in got] == [("u0", "record_unreadable"), ("u1", "record_unreadable")]
    assert "CRC" in got[0][4] or "checksum" in got[0][4].lower()
