"""Scheduled builds: ``capgap curate --cache`` reuses embeddings, captions and gate scores.

A rerun over the same input computes nothing and gives the same rows; an input grown by one
shard computes only the new rows and gives the rows of a from-scratch build; a changed
captioner recomputes captions only, a changed CLIP run embeddings and gate scores only; a
build killed mid-run leaves nothing a later build reads; ``capgap cache stats / prune``.

Equality: scores of a build that read an embedding from the cache are compared with those of a
build that computed it with ``same_rows`` (floats to 1e-5: RunInference's batch sizes move an
embedding by ~1e-7, benchmarks/cluster_check.py); two builds that both read every embedding
from the cache must agree exactly, every column of every row.

    .venv/bin/python -m pytest -q tests/test_cache.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_compare import cluster_check

from capgap.pipeline import cache as cache_cmd
from capgap.pipeline import curate, incremental
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms.schema import OUTPUTS

SETS = [
    "score.bank_size=8",
    "model.min_batch_size=4",
    "model.max_batch_size=8",
    "decide.drop.mode=quantile",
    "decide.drop.value=0.25",
    "decide.recaption.mode=top_fraction",
    "decide.recaption.value=0.5",
]
ROWS_PER_SHARD, SHARDS = 4, 10


def _write_shards(folder: Path, first: int, count: int) -> None:
    split = SplitConfig(n=200, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    for s in range(first, first + count):
        rows = [
            make_row(s * ROWS_PER_SHARD + i, "web", split, 0, 32, 0.05)
            for i in range(ROWS_PER_SHARD)
        ]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / f"web-{s:02d}.parquet")


def build(folder: Path, output: Path, cache: Path | None, *extra: str) -> dict:
    argv = ["--input", str(folder / "*.parquet"), "--output", str(output)]
    argv += [f"--set={s}" for s in SETS]
    if cache is not None:
        argv += ["--cache", str(cache)]
    return curate.run([*argv, *extra])


def misses(manifest: dict, stage: str) -> int:
    return manifest["metrics"].get(f"cache.{stage}.miss", 0)


def hits(manifest: dict, stage: str) -> int:
    return manifest["metrics"].get(f"cache.{stage}.hit", 0)


def same(a: Path, b: Path, exact: bool = False) -> list[str]:
    """Names of the outputs whose rows differ (floats to 1e-5 unless ``exact``)."""
    rows_a, rows_b = cluster_check.rows_of(a), cluster_check.rows_of(b)
    if exact:
        return [n for n in OUTPUTS if rows_a[n] != rows_b[n]]
    return [n for n in OUTPUTS if not cluster_check.same_rows(rows_a[n], rows_b[n])]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """first (cold cache), rerun, rerun again, grown by a shard (cached), grown from scratch."""
    root = tmp_path_factory.mktemp("scheduled")
    data, cache = root / "in", root / "cache"
    data.mkdir()
    _write_shards(data, 0, SHARDS)
    out = {"root": root, "data": data, "cache": cache}
    out["first"] = build(data, root / "first", cache)
    out["rerun"] = build(data, root / "rerun", cache)
    out["again"] = build(data, root / "again", cache)
    _write_shards(data, SHARDS, 1)  # the input grows by 10%
    out["grown"] = build(data, root / "grown", cache)
    out["scratch"] = build(data, root / "scratch", None)
    return out


def test_rerun_computes_nothing_and_gives_the_same_rows(builds):
    first, rerun, _again = builds["first"], builds["rerun"], builds["again"]
    n = SHARDS * ROWS_PER_SHARD
    assert misses(first, "embed") == n and hits(first, "embed") == 0
    # the 10 candidates the bank pass embedded (a bank of 8, 2 spares) miss the cache too,
    # and take the bank pass's embeddings, not the model's
    assert first["metrics"]["embeddings_from_bank"] == 10
    assert rerun["metrics"].get("embeddings_from_bank", 0) == 0  # every row a hit
    assert misses(rerun, "embed") == 0 and hits(rerun, "embed") == n
    assert misses(rerun, "bank_embed") == 0 and hits(rerun, "bank_embed") > 0
    assert rerun["cache"]["stages"]["embed"] == {"hit": n, "miss": 0}
    assert rerun["counts"] == first["counts"] and rerun["thresholds"] == first["thresholds"]
    root = builds["root"]
    assert not same(root / "first", root / "rerun")
    assert not same(root / "rerun", root / "again", exact=True)  # both read every embedding
    assert rerun["lineage"]["previous_build_id"] == first["build_id"]
    assert rerun["lineage"]["inputs"] == {
        "known": True,
        "new": [],
        "changed": [],
        "removed": [],
        "unchanged": SHARDS,
    }


def test_grown_input_embeds_only_the_new_rows(builds):
    grown, scratch = builds["grown"], builds["scratch"]
    assert misses(grown, "embed") == ROWS_PER_SHARD
    assert hits(grown, "embed") == SHARDS * ROWS_PER_SHARD
    assert grown["lineage"]["inputs"]["new"] == [f"web-{SHARDS:02d}.parquet"]
    assert grown["lineage"]["inputs"]["unchanged"] == SHARDS
    assert grown["lineage"]["previous_build_id"] == builds["again"]["build_id"]
    assert grown["counts"] == scratch["counts"] and grown["bank"] == scratch["bank"]
    assert not same(builds["root"] / "grown", builds["root"] / "scratch")
    assert "cache" not in scratch and not any(k.startswith("cache.") for k in scratch["metrics"])


def test_without_cache_the_graph_has_no_join(builds, tmp_path):
    labels = {}
    for name, cache in (("off", None), ("on", builds["cache"])):
        cfg, options = curate.parse(
            ["--input", str(builds["data"] / "*.parquet"), "--output", str(tmp_path / name)]
            + (["--cache", str(cache)] if cache else [])
        )
        p = curate.planned_pipeline(cfg, options)
        proto = p.to_runner_api()
        labels[name] = [t.unique_name for t in proto.components.transforms.values()]
    assert not [n for n in labels["off"] if "LookUp" in n or "Cache" in n]
    assert [n for n in labels["on"] if n.endswith("LookUp/Join")]


def test_changed_input_shard_is_recorded(builds, tmp_path):
    data = builds["data"]
    shard = data / "web-00.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 2), shard)  # a shard replaced with fewer rows
    os.utime(shard, (time.time() + 5, time.time() + 5))
    removed = data / "web-01.parquet"
    kept = removed.read_bytes()
    removed.unlink()
    try:
        record = incremental.lineage(
            "x",
            curate.discover(curate.ReadConfig(), str(data / "*.parquet")),
            str(builds["root"] / "grown"),
            None,
            str(tmp_path),
        )
    finally:
        removed.write_bytes(kept)
        pq.write_table(table, shard)
    assert record["previous_build_id"] == builds["grown"]["build_id"]
    assert record["inputs"]["changed"] == ["web-00.parquet"]
    assert record["inputs"]["removed"] == ["web-01.parquet"]
    assert record["inputs"]["unchanged"] == SHARDS - 1


def test_stats_and_prune(builds, tmp_path, capsys):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(builds["cache"], cache)
    report = cache_cmd.stats(str(cache))
    (space,) = report["spaces"].values()
    assert space["kind"] == "embeddings"
    # every embedding computed once: 40 by the first build, 4 by the grown one
    assert space["entries"] == (SHARDS + 1) * ROWS_PER_SHARD
    assert space["builds"] == 4 and report["uncommitted"]["files"] == 0
    assert cache_cmd.main(["stats", str(cache)]) == 0
    assert "capgap-micro-vit@" in capsys.readouterr().out
    # a killed build's leftovers: never read, pruned once old
    stray = next((cache / "embeddings").iterdir()) / "20200101T000000Z-deadbeef" / "part.parquet"
    stray.parent.mkdir()
    stray.write_bytes(b"PAR1 truncated")
    assert cache_cmd.stats(str(cache))["uncommitted"]["files"] == 1
    report = cache_cmd.prune(str(cache), keep_latest=1)
    assert report["deleted_files"] == 1 and not report["dropped_spaces"]
    assert not stray.exists()
    # dropping every build older than 0 days empties it
    cache_cmd.prune(str(cache), older_than_days=-1)
    after = cache_cmd.stats(str(cache))
    assert after["builds"] == 0 and after["totals"]["bytes"] == 0


def test_uncommitted_entries_are_never_read(builds, tmp_path):
    """A corrupt part file with no commit record next to the committed ones: ignored."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(builds["cache"], cache)
    space = next((cache / "embeddings").iterdir())
    junk = space / "20990101T000000Z-killed00" / "part-00000-of-00001.parquet"
    junk.parent.mkdir()
    junk.write_bytes(b"PAR1" + b"\0" * 64)
    again = build(builds["data"], tmp_path / "out", cache, "--direct_running_mode=multi_processing")
    assert misses(again, "embed") == 0
    assert not same(builds["root"] / "grown", tmp_path / "out")


def _fake_build(cache, build_id: str, finished: str, spaces: dict[str, int]) -> None:
    """A committed build by hand: ``spaces`` {kind/fingerprint: entries}."""
    from capgap.transforms.cache import SCHEMAS

    record = {"build_id": build_id, "finished_at": finished, "spaces": {}}
    for name, n in spaces.items():
        kind = name.split("/")[0]
        rel = f"{name}/{build_id}/part-00000-of-00001.parquet"
        (cache / rel).parent.mkdir(parents=True)
        rows = [{"key": f"{build_id}-{i}", "text": "a", "source": "m@1"} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[kind]), cache / rel)
        record["spaces"][name] = {"settings": {"captioner": {"fingerprint": name}}, "files": [rel]}
    (cache / "commits").mkdir(exist_ok=True)
    (cache / "commits" / f"{build_id}.json").write_text(json.dumps(record))


def test_prune_drops_spaces_the_latest_builds_no_longer_use(tmp_path):
    cache = tmp_path / "cache"
    _fake_build(cache, "20260101T000000Z-aaaaaaaa", "2026-01-01T00:00:00Z", {"captions/old": 3})
    _fake_build(cache, "20260102T000000Z-bbbbbbbb", "2026-01-02T00:00:00Z", {"captions/new": 2})
    before = cache_cmd.stats(str(cache))
    assert {k: v["entries"] for k, v in before["spaces"].items()} == {
        "captions/old": 3,
        "captions/new": 2,
    }
    dry = cache_cmd.prune(str(cache), keep_latest=1, dry_run=True)
    assert dry["dropped_spaces"] == ["captions/old"] and (cache / "captions" / "old").exists()
    assert cache_cmd.main(["prune", str(cache), "--keep-latest", "1"]) == 0
    after = cache_cmd.stats(str(cache))
    assert list(after["spaces"]) == ["captions/new"] and after["uncommitted"]["files"] == 0
    assert not (cache / "captions" / "old").exists()
    old = json.loads((cache / "commits" / "20260101T000000Z-aaaaaaaa.json").read_text())
    assert old["spaces"] == {}


def test_cache_auto_sits_next_to_the_output():
    assert incremental.cache_prefix("auto", "gs://b/curated/daily/") == "gs://b/curated/daily-cache"
    assert incremental.cache_prefix("gs://b/cache/", "gs://b/out") == "gs://b/cache"


def test_rotated_jpegs_score_as_without_the_cache(tmp_path):
    """An EXIF-rotated JPEG is stored as a lossy JPEG re-encode: a miss must embed the pixels
    the decode saw, not a decode of the stored bytes, so a cached build scores as an uncached
    one (and the stored bytes do decode to different pixels, so this can fail)."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from capgap.transforms.decode import DecodeConfig, decode_image

    folder = tmp_path / "in"
    folder.mkdir()
    photo = Image.fromarray(load_sample_image("china.jpg")).resize((96, 64))
    rows = []
    for i in range(8):
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 2 else 8
        buffer = io.BytesIO()
        photo.rotate(i * 7).save(buffer, "JPEG", quality=80, exif=exif.tobytes())
        rows.append({"uid": f"r{i}", "image": buffer.getvalue(), "caption": f"a photo {i}"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "photos.parquet")
    decoded = decode_image(rows[1]["image"], DecodeConfig())
    assert "reencoded_jpeg" in decoded.notes
    again = decode_image(decoded.data, DecodeConfig()).pixels
    assert not np.array_equal(again, decoded.pixels)  # the stored bytes are lossy
    build(folder, tmp_path / "plain", None)
    cached = build(folder, tmp_path / "cached", tmp_path / "cache")
    assert misses(cached, "embed") == 8
    assert same(tmp_path / "plain", tmp_path / "cached") == []
