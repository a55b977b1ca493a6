"""The synthetic world's guarantees: named attributes, mismatch rate, labels vs pixels, determinism."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capgap.core import world
from capgap.pipeline import synth


def _make(split: str = "web", n: int = 400, **split_overrides) -> list[dict]:
    cfg = synth.SynthConfig()
    for key, value in split_overrides.items():
        setattr(cfg.splits[split], key, value)
    sp = cfg.splits[split]
    return [synth.make_row(i, split, sp, 0, 32, 0.05) for i in range(n)]


def test_caption_names_exactly_k_attributes():
    for row in _make(n=300):
        if row["mismatched"]:
            continue
        parsed = world.parse_caption(row["caption"])
        named = {name for name in world.ATTRIBUTE_NAMES if parsed[name] is not None}
        assert named == set(row["named_attributes"])
        assert len(named) == row["k"]
        assert parsed["object"] == row["object"]
        for name in named:
            assert parsed[name] == row[name], (row["caption"], name)


def test_fixed_k_and_dense_split():
    rows = _make(n=100, k=2)
    assert {row["k"] for row in rows} == {2}
    dense = _make(split="test", n=50)
    assert all(row["k"] == len(world.ATTRIBUTE_NAMES) for row in dense)
    assert all(
        row["caption"] == world.dense_caption(world.Item(*(row[c] for c in world.LABEL_COLUMNS)))
        for row in dense
    )


def test_k_distribution_follows_weights():
    rows = _make(n=2000)
    counts = np.bincount([row["k"] for row in rows], minlength=6) / len(rows)
    expected = np.asarray(synth.SynthConfig().splits["web"].k_weights)
    assert np.abs(counts - expected).max() < 0.04


def test_mismatch_rate_within_tolerance_and_mismatched_captions_describe_another_object():
    rows = _make(n=3000, mismatch_rate=0.2)
    rate = np.mean([row["mismatched"] for row in rows])
    assert abs(rate - 0.2) < 0.025  # ~3 standard errors at n=3000
    for row in rows:
        named_object = world.parse_caption(row["caption"])["object"]
        assert (named_object != row["object"]) == row["mismatched"]
    assert not any(row["mismatched"] for row in _make(split="seed", n=300))


def test_labels_consistent_with_pixels():
    """The named colour is the dominant object colour; the object sits at its position."""
    rows = _make(split="test", n=300)
    colour_hits = 0
    position_hits = 0
    for row in rows:
        pixels = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        assert pixels.shape == (32, 32, 3)
        colour_hits += world.dominant_colour(pixels, row["background"]) == row["colour"]
        item = world.Item(*(row[c] for c in world.LABEL_COLUMNS))
        ys, xs = np.nonzero(world.object_mask(item, pixels))
        cx, cy = (xs.mean() + 0.5) / 32, (ys.mean() + 0.5) / 32
        px, py = world.POSITIONS[row["position"]]
        position_hits += abs(cx - px) < 0.15 and abs(cy - py) < 0.15
    assert colour_hits / len(rows) >= 0.97
    assert position_hits / len(rows) >= 0.9


def test_sizes_are_ordered_by_object_area():
    rows = _make(split="test", n=600)
    areas: dict[str, list[float]] = {size: [] for size in world.SIZES}
    for row in rows:
        if row["texture"] != "solid":
            continue
        pixels = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        item = world.Item(*(row[c] for c in world.LABEL_COLUMNS))
        areas[row["size"]].append(world.object_mask(item, pixels).mean())
    means = [np.mean(areas[size]) for size in ("small", "medium", "large")]
    assert means[0] < means[1] < means[2]


def test_every_vocabulary_value_appears():
    rows = _make(n=1500)
    for name, values in {"object": world.OBJECTS, **world.ATTRIBUTES}.items():
        assert {row[name] for row in rows} == set(values)


def test_deterministic_and_independent_of_shard_count(tmp_path):
    tables = []
    for run, shards in enumerate((4, 4, 3)):
        cfg = synth.SynthConfig(out=str(tmp_path / f"run{run}"), split="web", n=120, shards=shards)
        paths = synth.run(cfg, show_progress=False)["web"]
        assert len(paths) == shards
        rows = pq.ParquetDataset([str(p) for p in paths]).read().to_pylist()
        tables.append(sorted(rows, key=lambda row: row["uid"]))
    assert tables[0] == tables[1] == tables[2]
    assert (tmp_path / "run0" / "synth_config.yaml").is_file()
    other_seed = synth.SynthConfig(out=str(tmp_path / "other"), split="web", n=120, seed=1)
    synth.run(other_seed, show_progress=False)
    rows = pq.ParquetDataset(str(tmp_path / "other" / "web")).read().to_pylist()
    assert sorted(rows, key=lambda row: row["uid"]) != tables[0]


def test_shards_written_side_by_side_are_the_same_files(tmp_path):
    written = {}
    for processes in (1, 2):
        cfg = synth.SynthConfig(
            out=str(tmp_path / f"p{processes}"), split="all", n=30, shards=3, processes=processes
        )
        written[processes] = synth.run(cfg, show_progress=False)
    assert list(written[1]) == list(written[2]) == list(cfg.splits)
    for name, paths in written[1].items():
        assert [p.name for p in paths] == [p.name for p in written[2][name]]
        for one, two in zip(paths, written[2][name], strict=True):
            assert one.read_bytes() == two.read_bytes()
    with pytest.raises(ValueError, match="processes"):
        synth.SynthConfig(processes=0)


def test_splits_written_by_separate_calls_are_the_same_files(tmp_path):
    whole = synth.SynthConfig(out=str(tmp_path / "whole"), split="all", n=30, shards=2)
    written = synth.run(whole, show_progress=False)
    parts = synth.SynthConfig(out=str(tmp_path / "parts"), split="all", n=30, shards=2)
    names = list(parts.splits)
    first = synth.run(parts, show_progress=False, only=names[:1])
    rest = synth.run(parts, show_progress=False, only=names[1:])
    assert list(first) == names[:1] and list(rest) == names[1:]
    for name, paths in written.items():
        split_paths = (first | rest)[name]
        assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in split_paths]
    with pytest.raises(ValueError, match="no split"):
        synth.run(parts, show_progress=False, only=["nope"])


def test_parquet_schema(tmp_path):
    cfg = synth.SynthConfig(out=str(tmp_path), split="seed", n=10, shards=2)
    path = synth.run(cfg, show_progress=False)["seed"][0]
    schema = pq.read_schema(path)
    assert schema.names == synth.SCHEMA.names
    assert path.name == "seed-00000-of-00002.parquet"


def test_invalid_split_config_is_rejected():
    with pytest.raises(ValueError, match="k_weights"):
        synth.SplitConfig(k_weights=[1.0])
    with pytest.raises(ValueError, match="image_size"):
        synth.SynthConfig(image_size=16)


def test_terse_view_is_the_same_item_with_fewer_attributes():
    dense = synth.SplitConfig(n=50)
    viewed = synth.SplitConfig(n=50, terse_k_weights=[0.5, 0.5, 0, 0, 0, 0])
    for i in range(50):
        a = synth.make_row(i, "test", dense, 0, 32, 0.05)
        b = synth.make_row(i, "test", viewed, 0, 32, 0.05)
        terse = b.pop(synth.TERSE_COLUMN)
        assert a == b  # the view has a stream of its own: the split is otherwise unchanged
        parsed = world.parse_caption(terse)
        assert parsed["object"] == a["object"]  # never mismatched
        named = [name for name in world.ATTRIBUTE_NAMES if parsed.get(name) is not None]
        assert len(named) <= 1 and all(parsed[name] == a[name] for name in named)
    assert synth.split_schema(viewed).names == [*synth.SCHEMA.names, synth.TERSE_COLUMN]
    with pytest.raises(ValueError, match="terse_k_weights"):
        synth.SplitConfig(terse_k_weights=[1.0])
