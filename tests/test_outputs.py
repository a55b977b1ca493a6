"""A ``capgap curate`` output read by the tools users read it with: ``datasets`` (through
the dataset card), pyarrow, polars, ``webdataset``, and capgap's own readers.

One small build (synthetic rows plus EXIF-rotated real photos, uids with dots, a bad row,
``write.formats: [parquet, webdataset]``) is shared by every test.

    .venv/bin/python -m pytest -q tests/test_outputs.py
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image, ImageOps

from capgap.pipeline import curate
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms.schema import IMAGE_TYPE
from capgap.transforms.wds_write import sample_key

N_SYNTH = 16
SETS = [
    "score.bank_size=8",
    "model.min_batch_size=4",
    "model.max_batch_size=8",
    "decide.drop.mode=quantile",
    "decide.drop.value=0.3",
    "write.formats=[parquet,webdataset]",
    "write.webdataset_samples_per_shard=6",
]


def rotated_photo(name: str, orientation: int) -> bytes:
    """A scikit-learn sample photo as a phone stores it: JPEG, EXIF orientation set."""
    from sklearn.datasets import load_sample_image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image(name)).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    split = SplitConfig(n=N_SYNTH, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(N_SYNTH)]
    for i, (name, orientation) in enumerate(
        [("china.jpg", 6), ("flower.jpg", 8), ("china.jpg", 3), ("flower.jpg", 6)]
    ):
        rows.append(dict(rows[i], image=rotated_photo(name, orientation)))
    for i, row in enumerate(rows):
        row["uid"] = f"metadata.csv#{i}"  # a dot: not a WebDataset key as it is
    rows.append(dict(rows[0], uid="bad.row", image=b"junk"))
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "web.parquet")
    output = root / "out"
    argv = ["--input", str(root / "*.parquet"), "--output", str(output)]
    manifest = curate.run(argv + [f"--set={s}" for s in SETS], test_pipeline=TestPipeline())
    return str(output), manifest, {r["uid"]: r for r in rows}


def parquet_rows(output: str, folder: str) -> list[dict]:
    return [
        row
        for path in sorted(glob.glob(os.path.join(output, folder, "*.parquet")))
        for row in pq.read_table(path).to_pylist()
    ]


# --- Hugging Face datasets -------------------------------------------------------------------


def test_load_dataset_reads_the_card_configs(build, tmp_path):
    import datasets

    output, manifest, _ = build
    counts = manifest["counts"]
    cache = str(tmp_path / "hf")
    curated = datasets.load_dataset(output, split="train", cache_dir=cache)
    assert len(curated) == counts["curated"] > 0
    assert isinstance(curated.features["image"], datasets.Image)
    first = curated[0]
    assert isinstance(first["image"], Image.Image)
    assert first["image"].format == first["image_format"]
    assert first["image"].size == (first["width"], first["height"])
    for config in ("rejected", "errors"):
        ds = datasets.load_dataset(output, config, split="train", cache_dir=cache)
        assert len(ds) == counts[config] > 0
    rejected = datasets.load_dataset(output, "rejected", split="train", cache_dir=cache)
    assert rejected.features == curated.features
    assert set(rejected["decision"]) == {"drop"}
    # the packaged Parquet builder on one folder works too
    ds = datasets.load_dataset(
        "parquet", data_dir=os.path.join(output, "curated"), split="train", cache_dir=cache
    )
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == counts["curated"]


def test_parquet_schema_is_what_datasets_writes(build, tmp_path):
    import datasets

    output, _, _ = build
    ours = pq.read_schema(glob.glob(os.path.join(output, "curated", "*.parquet"))[0])
    ds = datasets.load_dataset(output, split="train", cache_dir=str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    theirs = pq.read_schema(tmp_path / "hf.parquet")
    assert ours.field("image").type == IMAGE_TYPE
    assert ours.equals(theirs, check_metadata=True)


def test_curated_and_rejected_share_one_schema(build):
    output, _, _ = build
    schemas = [
        pq.read_schema(path)
        for folder in ("curated", "rejected")
        for path in glob.glob(os.path.join(output, folder, "*.parquet"))
    ]
    assert len(schemas) >= 2 and all(s.equals(schemas[0], check_metadata=True) for s in schemas)
    rejected = parquet_rows(output, "rejected")
    assert rejected and all(r["recaption_status"] is None for r in rejected)


# --- pyarrow, polars -------------------------------------------------------------------------


def test_pyarrow_dataset_per_folder_and_together(build):
    output, manifest, _ = build
    counts = manifest["counts"]
    curated = pds.dataset(os.path.join(output, "curated"))
    assert curated.count_rows() == counts["curated"]
    both = pds.dataset([curated, pds.dataset(os.path.join(output, "rejected"))])
    table = both.to_table(columns=["uid", "image", "decision"])
    assert table.num_rows == counts["curated"] + counts["rejected"]
    assert table.schema.field("image").type == IMAGE_TYPE


def test_polars_scans_curated_and_rejected_together(build):
    pl = pytest.importorskip("polars")
    output, manifest, _ = build
    counts = manifest["counts"]
    curated = pl.scan_parquet(os.path.join(output, "curated", "*.parquet")).collect()
    assert curated.height == counts["curated"]
    both = pl.scan_parquet(
        [os.path.join(output, f, "*.parquet") for f in ("curated", "rejected")]
    ).collect()
    assert both.height == counts["curated"] + counts["rejected"]
    image = both["image"].struct.field("bytes")[0]
    assert Image.open(io.BytesIO(image)).format == both["image_format"][0]


# --- the stored images -----------------------------------------------------------------------


def test_image_format_names_the_stored_bytes_on_every_row(build):
    output, _, inputs = build
    rows = parquet_rows(output, "curated") + parquet_rows(output, "rejected")
    assert len(rows) == len(inputs) - 1
    rotated = 0
    for row in rows:
        stored = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert row["image_format"] == stored.format, row["uid"]
        assert stored.size == (row["width"], row["height"])
        source = inputs[row["uid"]]["image"]
        if "exif_orientation" not in row["decode_notes"]:
            assert row["image"]["bytes"] == source  # untouched: the bytes as they came
            continue
        rotated += 1
        assert row["image_format"] == "JPEG" and len(row["image"]["bytes"]) <= 1.2 * len(source)
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(source))).convert("RGB"))
        got = np.asarray(stored.convert("RGB"))
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).mean() < 3.0  # one JPEG generation
    assert rotated == 4


# --- WebDataset ------------------------------------------------------------------------------


def test_webdataset_shards_hold_every_curated_row_once(build):
    wds = pytest.importorskip("webdataset")
    output, manifest, _ = build
    listed = manifest["outputs"]["curated-wds"]
    urls = [os.path.join(output, name) for name in listed["shards"]]
    assert sorted(urls) == sorted(glob.glob(os.path.join(output, "curated-wds", "*.tar")))
    curated = {r["uid"]: r for r in parquet_rows(output, "curated")}
    assert listed["total_samples"] == len(curated) == manifest["counts"]["curated"]
    seen = []
    for urls_one, count in listed["samples"].items():
        samples = list(wds.WebDataset(os.path.join(output, urls_one), shardshuffle=False))
        assert len(samples) == count
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        row = curated[meta["uid"]]
        seen.append(meta["uid"])
        assert sample["__key__"] == sample_key(meta["uid"]) and "." not in sample["__key__"]
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[row["image_format"]]
        assert sample[ext] == row["image"]["bytes"]
        assert sample["txt"].decode("utf-8") == row["caption"]
        assert meta["original_caption"] == row["original_caption"]
        assert meta["certainty"] == pytest.approx(row["certainty"])
    assert sorted(seen) == sorted(curated)


def test_webdataset_open_clip_style_pipeline(build):
    wds = pytest.importorskip("webdataset")
    output, manifest, _ = build
    n = len(manifest["outputs"]["curated-wds"]["shards"])
    urls = os.path.join(output, "curated-wds", f"shard-{{00000..{n - 1:05d}}}.tar")
    pairs = list(
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "txt")
    )
    assert len(pairs) == manifest["counts"]["curated"]
    assert all(isinstance(im, Image.Image) and isinstance(txt, str) for im, txt in pairs)
    assert any(im.size == (427, 640) for im, _ in pairs)  # a rotated photo, upright


def test_sample_keys_are_safe_and_unique():
    uids = ["metadata.csv#3", "metadata%2Ecsv#3", "a/b.c", "a_b c", "x~y", "é.jpg", "..", ""]
    keys = [sample_key(u) for u in uids]
    assert len(set(keys)) == len(uids)
    assert all("." not in k and "/" not in k for k in keys)


# --- capgap's own readers --------------------------------------------------------------------


def test_train_and_recurate_read_the_output(build, tmp_path):
    from apache_beam.testing.util import assert_that

    from capgap.models.clip_factory import create_clip
    from capgap.pipeline.parquet_data import ParquetPairs
    from capgap.transforms.readers import ReadConfig, ReadRecords, discover

    output, manifest, _ = build
    files = sorted(glob.glob(os.path.join(output, "curated", "*.parquet")))
    _, preprocess, tokenizer = create_clip("capgap-micro-vit")
    pairs = list(ParquetPairs(files, preprocess, tokenizer, shuffle=False))
    assert len(pairs) == manifest["counts"]["curated"]
    plan = discover(ReadConfig(), os.path.join(output, "curated", "*.parquet"))
    with TestPipeline() as p:
        records = p | ReadRecords(plan)

        def check(items):
            assert len(items) == manifest["counts"]["curated"]
            for _, record in items:
                assert record["error"] is None and Image.open(io.BytesIO(record["image"]))

        assert_that(records, check)
