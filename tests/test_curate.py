"""``capgap curate`` end to end on a few dozen mixed good/bad rows, tiny random-init CLIP.

Every input row must land in exactly one of curated / rejected / errors; the manifest
must agree; DirectRunner in_memory and multi_processing (2 workers) must give the
same rows; recaptioning is wired behind ``recaption.enabled``.

    .venv/bin/python -m pytest -q tests/test_curate.py
"""

from __future__ import annotations

import glob
import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

from capgap.pipeline import curate, runner_presets
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row

N_GOOD = 24
# Small bank and batches keep this fast; quantile rules exercise the histogram path.
BASE_SETS = [
    "score.bank_size=8",
    "model.min_batch_size=4",
    "model.max_batch_size=8",
    "decide.drop.mode=quantile",
    "decide.drop.value=0.25",
    "decide.recaption.mode=top_fraction",
    "decide.recaption.value=0.5",
]


def png(size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory):
    """Two good synthetic shards with bad rows mixed in, plus one unreadable shard."""
    root = tmp_path_factory.mktemp("mixed")
    split = SplitConfig(n=N_GOOD, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(N_GOOD)]
    truncated = rows[0]["image"][: len(rows[0]["image"]) // 2]
    bad = [
        dict(rows[1], uid="bad-empty", image=b""),
        dict(rows[1], uid="bad-trunc", image=truncated),
        dict(rows[1], uid="bad-junk", image=b"GIF89a not really"),
        dict(rows[1], uid="bad-blankcap", caption=" \t "),
        dict(rows[1], uid="bad-small", image=png(size=4)),
        dict(rows[2]),  # a duplicate uid (the later copy goes to errors)
    ]
    table = pa.Table.from_pylist(rows[: N_GOOD // 2] + bad[:3], schema=SCHEMA)
    pq.write_table(table, root / "web-0.parquet")
    table = pa.Table.from_pylist(rows[N_GOOD // 2 :] + bad[3:], schema=SCHEMA)
    pq.write_table(table, root / "web-1.parquet")
    (root / "web-2.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    expected_errors = {
        "bad-empty": "image_empty",
        "bad-trunc": "image_truncated",
        "bad-junk": "image_undecodable",
        "bad-blankcap": "caption_empty",
        "bad-small": "image_too_small",
        rows[2]["uid"]: "duplicate_uid",
        "web-2.parquet#shard": "shard_unreadable",
    }
    return str(root / "*.parquet"), N_GOOD + len(bad) + 1, expected_errors


def read_rows(output: str) -> dict[str, list[dict]]:
    out = {}
    for folder in ("curated", "rejected", "errors"):
        rows = []
        for path in sorted(glob.glob(os.path.join(output, folder, "*.parquet"))):
            rows += pq.read_table(path).to_pylist()
        out[folder] = rows
    return out


def argv(pattern: str, output, *extra: str) -> list[str]:
    out = ["--input", pattern, "--output", str(output)]
    for s in BASE_SETS:
        out += ["--set", s]
    return out + list(extra)


@pytest.fixture(scope="module")
def in_memory_build(mixed_input, tmp_path_factory):
    pattern, _, _ = mixed_input
    output = tmp_path_factory.mktemp("build") / "out"
    manifest = curate.run(argv(pattern, output), test_pipeline=TestPipeline())
    return output, manifest


def test_every_row_lands_exactly_once(mixed_input, in_memory_build):
    _, n_rows, expected_errors = mixed_input
    output, manifest = in_memory_build
    rows = read_rows(output)
    counts = manifest["counts"]
    assert counts["rows_in"] == n_rows
    assert counts["rows_in"] == counts["curated"] + counts["rejected"] + counts["errors"]
    assert {k: len(v) for k, v in rows.items()} == {
        k: counts[k] for k in ("curated", "rejected", "errors")
    }
    assert manifest["metrics"]["rows_in"] == n_rows  # Beam counters agree with the data
    refs = [(r["source"], r["source_index"]) for v in rows.values() for r in v]
    assert len(refs) == len(set(refs)) == n_rows
    errors = {r["uid"]: r["reason"] for r in rows["errors"]}
    assert errors == expected_errors
    duplicate = next(r for r in rows["errors"] if r["reason"] == "duplicate_uid")
    assert duplicate["source"] == "web-1.parquet"  # the later copy of the uid
    good = rows["curated"] + rows["rejected"]
    assert len(good) == N_GOOD - 0 and all(r["image"] for r in good)
    # the quantile rule dropped about a quarter, for low certainty
    assert {r["reason"] for r in rows["rejected"]} <= {"low_certainty"}
    assert 3 <= len(rows["rejected"]) <= 9
    for row in rows["curated"]:
        assert row["decision"] in ("keep", "recaption")
        assert row["caption_source"] == "original"
        assert row["recaption_status"] == ("disabled" if row["decision"] == "recaption" else None)
        assert row["model_id"] == "capgap-micro-vit/random-init-seed0"
        assert 0.0 <= row["certainty"] <= 1.0 and 0.0 <= row["imbalance"] <= 1.0
        assert isinstance(row["mismatched"], bool) and row["k"] in range(6)  # passthrough kept
    assert any(r["decision"] == "recaption" for r in rows["curated"])


def test_manifest(in_memory_build):
    output, manifest = in_memory_build
    with open(os.path.join(output, "manifest.json"), encoding="utf-8") as fh:
        on_disk = json.load(fh)
    assert on_disk["status"] == "complete" and on_disk["counts"] == manifest["counts"]
    assert len(on_disk["input"]["fingerprint"]) == 64 and on_disk["input"]["files"] == 3
    assert on_disk["models"]["clip"]["id"] == "capgap-micro-vit/random-init-seed0"
    assert len(on_disk["models"]["clip"]["sha256"]) == 64
    assert on_disk["config"]["score"]["bank_size"] == 8
    assert on_disk["config"]["decode"]["model_max_side"] == 32  # the micro model's own side
    assert on_disk["bank"]["size"] == 8 and on_disk["bank"]["tau"] > 0
    assert 0.0 < on_disk["thresholds"]["certainty"] < 1.0
    assert on_disk["packages"]["apache-beam"] and on_disk["wall_time_s"] > 0
    for folder in ("curated", "rejected", "errors"):
        listed = sorted(os.path.join(output, f) for f in on_disk["outputs"][folder])
        assert listed == sorted(glob.glob(os.path.join(output, folder, "*.parquet")))
    # the dataset card is written; WebDataset shards only when write.formats asks
    assert on_disk["outputs"]["card"] == "README.md"
    with open(os.path.join(output, "README.md"), encoding="utf-8") as fh:
        assert fh.read().startswith("---\nconfigs:\n- config_name: curated\n")
    assert "curated-wds" not in on_disk["outputs"]
    assert not os.path.exists(os.path.join(output, "curated-wds"))


def test_refuses_to_overwrite_a_finished_build(mixed_input, in_memory_build):
    pattern, _, _ = mixed_input
    output, _ = in_memory_build
    with pytest.raises(FileExistsError):
        curate.run(argv(pattern, output))


def _comparable(rows: dict[str, list[dict]]) -> dict:
    out = {}
    for folder, items in rows.items():
        for row in items:
            out[(folder, row["uid"], row["source"], row["source_index"])] = row
    return out


def test_multi_processing_gives_the_same_rows(mixed_input, in_memory_build, tmp_path):
    pattern, _, _ = mixed_input
    reference, _ = in_memory_build
    output = tmp_path / "mp"
    curate.run(
        argv(
            pattern,
            output,
            "--direct_running_mode=multi_processing",
            "--direct_num_workers=2",
        )
    )
    a, b = _comparable(read_rows(reference)), _comparable(read_rows(output))
    assert set(a) == set(b)
    for key in a:
        for column, value in a[key].items():
            other = b[key][column]
            if isinstance(value, float):
                assert math.isclose(value, other, abs_tol=1e-5), (key, column)
            else:
                assert value == other, (key, column)


def test_recaption_stage_is_wired_behind_the_switch(mixed_input, tmp_path, monkeypatch):
    """recaption.enabled routes the rows marked recaption (only those) through Recaption."""
    import apache_beam as beam

    from capgap.transforms import recaption

    seen = []

    class FakeRecaption(beam.PTransform):
        def __init__(self, config, label=None, cache=None, gate_precision=None):
            super().__init__(label)
            assert cache is None  # no --cache: no lookups
            assert gate_precision.cpu_bf16  # the gate CLIP follows the scoring CLIP's precision
            seen.append(config)

        def expand(self, rows):
            def rewrite(row):
                out = dict(row)
                out["original_caption"] = row["caption"]
                out["caption"] = "a dense caption of " + row["caption"]
                out["caption_source"] = "fake-captioner@0"
                out["recaption_status"] = "recaptioned"
                return out

            return rows | beam.Map(rewrite)

    monkeypatch.setattr(curate, "Recaption", FakeRecaption)
    pattern, _, _ = mixed_input
    output = tmp_path / "recap"
    manifest = curate.run(
        argv(pattern, output, "--set", "recaption.enabled=true", "--set", "model.cpu_bf16=true"),
        test_pipeline=TestPipeline(),
    )
    assert len(seen) == 1 and isinstance(seen[0], recaption.RecaptionConfig)
    rows = read_rows(output)["curated"]
    marked = [r for r in rows if r["decision"] == "recaption"]
    assert marked and all(r["caption_source"] == "fake-captioner@0" for r in marked)
    assert all(r["caption"] == "a dense caption of " + r["original_caption"] for r in marked)
    kept = [r for r in rows if r["decision"] == "keep"]
    assert all(r["caption_source"] == "original" and r["recaption_status"] is None for r in kept)
    assert manifest["recaption"] == {"enabled": True, "ran": True}


def test_bad_config_is_rejected_before_running(tmp_path):
    with pytest.raises(curate.ConfigError):
        curate.parse(["--input", "x", "--set", "decide.drop.mode=sometimes"])
    with pytest.raises(curate.ConfigError):
        curate.parse(
            ["--input", "x", "--set", "recaption.enabled=true", "--set", "recaption.stage.bogus=1"]
        )
    with pytest.raises(curate.ConfigError):
        curate.parse([])
    cfg, options = curate.parse(
        ["--input", "x", "--reference", "runs/r", "--runner", "DirectRunner"]
    )
    assert cfg.model_config().run_dir == "runs/r"
    assert options.get_all_options()["runner"] == "DirectRunner"


@pytest.mark.parametrize("preset", ["direct", "portable", "dataflow", "spark", "flink"])
def test_runner_presets(preset):
    flags, overrides = runner_presets.preset_flags(preset)
    assert any(f.startswith("--runner=") for f in flags)
    cfg, options = curate.parse(
        ["--runner_preset", preset, "--input", "x", "--set", "model.device=cpu"]
    )
    assert cfg.model.device == "cpu"  # the command line wins over the preset
    if preset == "dataflow":
        assert "--setup_file=./setup.py" in flags
        assert any(
            "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver" in f
            for f in flags
        )
        assert any(f.startswith("--sdk_container_image=") for f in flags)
        assert "model.device=cuda" in overrides
    if preset in ("spark", "flink"):
        assert "--runner=PortableRunner" in flags
