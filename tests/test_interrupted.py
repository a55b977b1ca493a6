"""An interrupted build: ``capgap curate`` killed with SIGKILL midway, then started again.

A real subprocess runs ``python -m capgap.pipeline.cli curate`` over the bad-input
corpus; once it has started writing (Beam's temp folders appear under the output
prefix) its whole process group gets SIGKILL. The killed prefix must hold no
manifest and no final part file (Beam writes to temp and renames on finalize; the
manifest is written last). The same command is then run again and must give a
complete build: a manifest whose outputs are exactly the files present, every input
row exactly once, and the same rows as an uninterrupted in-process run (the shared
reference build).

    .venv/bin/python -m pytest -q tests/test_interrupted.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bad_inputs  # noqa: E402

READER = "parquet"
START_TIMEOUT_S = 240


def _command(pattern: str, output: Path) -> list[str]:
    args = bad_inputs.curate_argv(pattern, output, "--direct_running_mode=in_memory")
    return [sys.executable, "-m", "capgap.pipeline.cli", "curate", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """(corpus, reference build, build as left by the kill, build after the restart, log)."""
    corpus, reference = bad_inputs.reference_build(tmp_path_factory.getbasetemp(), READER)
    root = tmp_path_factory.mktemp("interrupted")
    output = root / "output"
    command = _command(corpus.patterns[0], output)
    with open(root / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if output.exists() and any(output.rglob("beam-temp*")):
                    break  # it is writing: the sinks opened their temp folders
                time.sleep(0.05)
            finished_early = proc.poll() is not None
            time.sleep(0.3)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    log_text = (root / "killed.log").read_text(errors="replace")
    assert not finished_early, f"curate ended before it could be killed:\n{log_text[-3000:]}"
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log_text[-3000:])
    killed = bad_inputs.read_build(output)

    restart = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert restart.returncode == 0, restart.stdout[-2000:] + restart.stderr[-3000:]
    return corpus, reference, killed, bad_inputs.read_build(output), restart.stdout


def test_killed_build_shows_no_output(interrupted):
    _, _, killed, _, _ = interrupted
    assert killed.manifest is None, "a killed build must not look finished"
    assert not killed.files, f"final part files visible before the build finished: {killed.files}"
    assert killed.stray, "the kill came before the build started writing"
    assert all("beam-temp" in path for path in killed.stray), killed.stray


def test_restart_gives_a_complete_build(interrupted):
    corpus, _, _, restarted, stdout = interrupted
    manifest = restarted.manifest
    assert manifest is not None and manifest["status"] == "complete"
    for folder in ("curated", "rejected", "errors"):
        assert manifest["outputs"][folder] == [
            f"{folder}/{name}" for name in restarted.files.get(folder, [])
        ]
    landed = restarted.landed()
    missing = [c for c in corpus.cases if (c.source, c.index) not in landed]
    doubled = {ref: len(rows) for ref, rows in landed.items() if len(rows) != 1}
    assert not missing and not doubled, (missing, doubled)
    total = sum(len(rows) for rows in restarted.rows.values())
    assert total == len(corpus.cases) == manifest["counts"]["rows_in"]
    assert f"rows_in={len(corpus.cases)}" in stdout


def test_restart_gives_the_same_rows_as_an_uninterrupted_run(interrupted):
    """Also: two in_memory runs over the same input agree (see tests/test_determinism.py)."""
    _, reference, _, restarted, _ = interrupted
    problems = bad_inputs.build_differences(reference, restarted)
    assert not problems, "\n".join(problems[:30])
    assert reference.manifest["counts"] == restarted.manifest["counts"]
    assert reference.manifest["input"] == restarted.manifest["input"]
    assert reference.placement == restarted.placement, "rows moved to other shards"


def test_restart_leaves_no_stale_temp_files(interrupted):
    """The dead run's beam-temp-* folders are gone: a recursive reader sees only this build."""
    _, _, _, restarted, _ = interrupted
    assert not restarted.stray, restarted.stray
