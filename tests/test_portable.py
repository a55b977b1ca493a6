"""``capgap curate`` on Beam's PortableRunner (the layer Flink and Spark run through) gives
the DirectRunner's rows: an in-process job service, LOOPBACK workers, input with bad rows.
Also: a failing step prints its traceback and exits 1; a user error stays one line.

    .venv/bin/python -m pytest -q tests/test_portable.py
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_compare import cluster_check

from capgap.pipeline import curate
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms import score
from capgap.transforms.schema import OUTPUTS

SETS = [
    "score.bank_size=8",
    "model.min_batch_size=4",
    "model.max_batch_size=8",
    "decide.drop.mode=quantile",
    "decide.drop.value=0.25",
    "decide.recaption.mode=top_fraction",
    "decide.recaption.value=0.5",
    "num_shards=2",
]


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    split = SplitConfig(n=30, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(30)]
    bad = [
        dict(rows[0], uid="bad-empty", image=b""),
        dict(rows[0], uid="bad-junk", image=b"GIF89a not really"),
        dict(rows[0], uid="bad-caption", caption=" \t "),
        dict(rows[1]),  # a duplicate uid
    ]
    pq.write_table(pa.Table.from_pylist(rows[:15] + bad[:2], schema=SCHEMA), root / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[15:] + bad[2:], schema=SCHEMA), root / "b.parquet")
    (root / "c.parquet").write_bytes(b"PAR1 not parquet PAR1")
    return str(root / "*.parquet")


def build(pattern: str, output, *runner: str) -> dict:
    argv = ["--input", pattern, "--output", str(output), *[f"--set={s}" for s in SETS]]
    return curate.run([*argv, *runner])


def test_portable_runner_gives_the_direct_runners_rows(pattern, tmp_path):
    direct = build(pattern, tmp_path / "direct", "--direct_running_mode=in_memory")
    portable = build(pattern, tmp_path / "portable", "--runner_preset=portable")
    assert portable["runner"] == "PortableRunner" and direct["runner"] == "DirectRunner"
    assert portable["counts"] == direct["counts"]
    assert portable["counts"]["rows_in"] == 35
    assert portable["counts"]["errors"] == 5  # 3 bad rows, 1 duplicate, 1 unreadable shard
    assert portable["thresholds"] == direct["thresholds"] and portable["bank"] == direct["bank"]
    a = cluster_check.rows_of(tmp_path / "direct")
    b = cluster_check.rows_of(tmp_path / "portable")
    for name in OUTPUTS:  # every row, every column; floats to 1e-5 (same_rows says why)
        assert cluster_check.same_rows(a[name], b[name]), name
    assert {k: v for k, v in portable["metrics"].items()} == direct["metrics"]
    written = json.loads((tmp_path / "portable" / "manifest.json").read_text())
    assert written["outputs"]["curated"] == [
        "curated/part-00000-of-00002.parquet",
        "curated/part-00001-of-00002.parquet",
    ]


def test_a_failing_step_prints_its_traceback(pattern, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(score, "batch_scores", broken)
    argv = ["--input", pattern, "--output", str(tmp_path / "out"), *[f"--set={s}" for s in SETS]]
    assert curate.main([*argv, "--direct_running_mode=in_memory"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err  # where it broke
    last = err.strip().splitlines()[-1]
    assert last.startswith("capgap curate: the pipeline failed: ValueError in step ")
    assert "Score" in last and "too many values to unpack" in last


def test_a_user_error_is_one_line(tmp_path, capsys):
    argv = ["--input", str(tmp_path / "none-*.parquet"), "--output", str(tmp_path / "out")]
    assert curate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"capgap curate: input pattern {str(tmp_path / 'none-*.parquet')!r} matched no files"
    ]


def test_a_build_where_every_row_fails_exits_non_zero(pattern, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--input", pattern, "--output", str(out), *[f"--set={s}" for s in SETS]]
    argv += ["--set=read.caption_columns=[no_such_column]", "--direct_running_mode=in_memory"]
    assert curate.main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capgap curate: the build failed: 35 of 35 rows")
    assert "most of them column_missing" in err[0]
    manifest = json.loads((out / "manifest.json").read_text())  # the counts are still written
    assert manifest["counts"]["errors"] == 35
    # a threshold of 1 never fails the build
    argv += ["--overwrite", "--set=max_error_fraction=1.0"]
    assert curate.main(argv) == 0


def test_portable_runner_reads_the_cache_a_direct_build_wrote(pattern, tmp_path):
    """Scheduled builds (``--cache``): the keyed join and the commit on the PortableRunner."""
    cache = str(tmp_path / "cache")
    direct = build(
        pattern, tmp_path / "direct", "--direct_running_mode=in_memory", "--cache", cache
    )
    portable = build(pattern, tmp_path / "portable", "--runner_preset=portable", "--cache", cache)
    embedded = direct["cache"]["stages"]["embed"]["miss"]
    assert embedded == 30 and direct["cache"]["stages"]["embed"]["hit"] == 0
    assert portable["cache"]["stages"]["embed"] == {"hit": embedded, "miss": 0}
    assert portable["metrics"]["cache.embed.hit"] == embedded
    assert portable["counts"] == direct["counts"]
    a = cluster_check.rows_of(tmp_path / "direct")
    b = cluster_check.rows_of(tmp_path / "portable")
    for name in OUTPUTS:
        assert cluster_check.same_rows(a[name], b[name]), name
