"""A cached build killed with SIGKILL while it writes cache entries, then run again.

The killed build must leave no commit record (so no later build reads what it wrote) and no
manifest; the restarted build must read none of the killed build's entries, finish, commit,
and give the rows of an uninterrupted build (tests/test_interrupted.py does the same for the
outputs). A later rerun then reads every embedding from the cache.

    .venv/bin/python -m pytest -q tests/test_cache_interrupted.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_compare import cluster_check

from capgap.pipeline import cache as cache_cmd
from capgap.pipeline import curate
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms.schema import OUTPUTS

N = 24
START_TIMEOUT_S = 240
SETS = ["score.bank_size=8", "model.min_batch_size=4", "model.max_batch_size=8"]


def _argv(pattern: str, output: Path, cache: Path) -> list[str]:
    argv = ["--input", pattern, "--output", str(output), "--cache", str(cache)]
    return argv + [f"--set={s}" for s in SETS] + ["--direct_running_mode=in_memory"]


def _writing(cache: Path) -> bool:
    """A cache sink has a file open in its temp folder: entries are being written."""
    return cache.exists() and any(p.is_file() for p in cache.rglob("beam-temp*/*"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-interrupted")
    split = SplitConfig(n=N, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(N)]
    (root / "in").mkdir()
    for s in range(2):
        table = pa.Table.from_pylist(rows[s * N // 2 : (s + 1) * N // 2], schema=SCHEMA)
        pq.write_table(table, root / "in" / f"web-{s}.parquet")
    pattern = str(root / "in" / "*.parquet")
    reference = curate.run(_argv(pattern, root / "reference", root / "reference-cache"))

    cache, output = root / "cache", root / "output"
    command = [
        sys.executable,
        "-m",
        "capgap.pipeline.cli",
        "curate",
        *_argv(pattern, output, cache),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(root / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline and not _writing(cache):
                time.sleep(0.02)
            finished_early = proc.poll() is not None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    log_text = (root / "killed.log").read_text(errors="replace")
    assert not finished_early, f"curate ended before it could be killed:\n{log_text[-3000:]}"
    killed = {
        "commits": sorted(p.name for p in (cache / "commits").glob("*")) if cache.exists() else [],
        "files": sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()),
        "manifest": (output / "manifest.json").exists(),
    }
    restart = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert restart.returncode == 0, restart.stdout[-2000:] + restart.stderr[-3000:]
    restarted = json.loads((output / "manifest.json").read_text())
    rerun = curate.run(_argv(pattern, root / "rerun", cache))
    return root, reference, killed, restarted, restart.stdout, rerun


def test_killed_build_commits_nothing(interrupted):
    _, _, killed, _, _, _ = interrupted
    assert not killed["manifest"]
    assert killed["commits"] == [], "a killed build must not commit cache entries"
    assert killed["files"], "the kill came before the build wrote any cache entry"


def test_restart_reads_nothing_of_the_killed_build_and_gives_the_same_rows(interrupted):
    root, reference, _, restarted, stdout, _ = interrupted
    assert restarted["cache"]["stages"]["embed"] == {"hit": 0, "miss": N}
    assert "cache.embed.miss" in stdout  # the counters printed at the end
    assert restarted["counts"] == reference["counts"]
    a, b = cluster_check.rows_of(root / "reference"), cluster_check.rows_of(root / "output")
    for name in OUTPUTS:
        assert cluster_check.same_rows(a[name], b[name]), name


def test_rerun_after_the_restart_reads_every_embedding(interrupted):
    root, _, _, restarted, _, rerun = interrupted
    assert rerun["cache"]["stages"]["embed"] == {"hit": N, "miss": 0}
    assert rerun["counts"] == restarted["counts"]
    a, b = cluster_check.rows_of(root / "output"), cluster_check.rows_of(root / "rerun")
    for name in OUTPUTS:
        assert cluster_check.same_rows(a[name], b[name]), name
    report = cache_cmd.stats(str(root / "cache"))
    (space,) = report["spaces"].values()
    assert space["entries"] == N and report["builds"] == 2
