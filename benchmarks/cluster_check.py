"""A cluster in miniature: ``capgap curate`` through a Beam job service and an EXTERNAL worker
pool whose Python has capgap only from the sdist, against the DirectRunner on the same input.

What Dataflow, Flink and Spark do, on one machine: the client submits the pipeline to a job
service (Beam's Python job service here, a separate process); the job service hands the
work to SDK workers started by a worker pool (another process, running the *worker*
Python: a venv with capgap installed from ``make sdist``, as in a worker image, and no
access to this checkout). The script starts and stops both, checks first that the pool's
``python`` imports capgap (a pool that cannot start workers otherwise leaves the client
waiting five minutes for a DEADLINE_EXCEEDED, the cause only in the pool's log), runs both
builds, compares every row and prints the wall time of each runner.

    python benchmarks/cluster_check.py                     # 2,000 rows + bad ones
    python benchmarks/cluster_check.py --rows 500 --keep   # keep build/cluster-check/
    python benchmarks/cluster_check.py --pool-python /usr/bin/python3   # the failure mode

Exit status 0 when the rows are identical, 1 otherwise, 2 when the cluster cannot start.
The worker venv shares the client venv's third-party packages (torch alone is 5 GB) through
a ``.pth`` line; capgap itself comes only from the sdist (the client's editable install is
not visible there: checked before the run).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("curated", "rejected", "errors")


def fail(message: str) -> NoReturn:
    """The cluster cannot start (or a build failed): say why on stderr, exit 2."""
    print(f"cluster check: {message}", file=sys.stderr)
    raise SystemExit(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, what: str, timeout: float):
    """Until ``port`` accepts connections; raises naming ``what`` and its log's tail."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            fail(f"{what} exited ({process.returncode}):\n{tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    fail(f"{what} did not listen on {port} in {timeout:.0f} s")


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def make_worker_venv(work: Path) -> Path:
    """A venv whose capgap is the sdist's; returns its ``bin`` folder."""
    dist = work / "dist"
    built = run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=ROOT)
    if built.returncode != 0:
        fail(f"sdist failed:\n{built.stderr}")
    sdist = next(dist.glob("capgap-*.tar.gz"))
    venv = work / "worker-venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    # Third-party packages from the client venv (a path line: its .pth files, and with them
    # the editable capgap, are not processed).
    (site / "client-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--ignore-installed",
            str(sdist),
        ],
    )
    if install.returncode != 0:
        fail(f"installing the sdist failed:\n{install.stderr[-2000:]}")
    return venv / "bin"


def preflight(pool_env: dict[str, str]) -> str:
    """The ``python`` the pool will start workers with must import Beam and capgap (from
    outside this checkout); returns where its capgap lives. Exits 2 naming the cause."""
    probe = "import apache_beam, capgap.pipeline.curate as c; print(c.__file__)"
    result = run(["python", "-c", probe], env=pool_env, cwd="/", timeout=120)
    if result.returncode != 0:
        which = run(["sh", "-c", "command -v python"], env=pool_env).stdout.strip()
        cause = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        fail(
            f"the worker pool's python ({which or 'not found'}) cannot run "
            f"capgap workers: {cause}. Put a Python with capgap installed first on the pool's "
            "PATH (the pool starts workers with a bare `python`)."
        )
    location = result.stdout.strip()
    if Path(location).resolve() == (ROOT / "pipeline" / "curate.py").resolve():
        fail(f"the worker imports capgap from this checkout ({location})")
    return location


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def make_input(folder: Path, rows: int) -> str:
    from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row

    folder.mkdir(parents=True, exist_ok=True)
    split = SplitConfig(n=rows, k_weights=[0.2, 0.3, 0.25, 0.15, 0.1, 0.0], mismatch_rate=0.1)
    good = [make_row(i, "web", split, 0, 32, 0.05) for i in range(rows)]
    bad = [
        dict(good[0], uid="bad-empty", image=b""),
        dict(good[0], uid="bad-junk", image=b"GIF89a not really"),
        dict(good[0], uid="bad-caption", caption=" \u200b "),
        dict(good[1]),  # a duplicate uid
    ]
    half = rows // 2
    pq.write_table(pa.Table.from_pylist(good[:half] + bad[:2], schema=SCHEMA), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(good[half:] + bad[2:], schema=SCHEMA), folder / "b.parquet")
    (folder / "c.parquet").write_bytes(b"PAR1 not parquet PAR1")
    return str(folder / "*.parquet")


def curate(pattern: str, output: Path, beam_flags: list[str], log: Path) -> float:
    command = [
        sys.executable, "-m", "capgap.pipeline.cli", "curate", "--input", pattern,
        "--output", str(output), "--overwrite", "--set=model.name=capgap-micro-vit",
        "--set=score.bank_size=256", "--set=decide.drop.mode=quantile",
        "--set=decide.drop.value=0.12", "--set=num_shards=2", *beam_flags,
    ]  # fmt: skip
    started = time.perf_counter()
    with open(log, "w") as fh:
        result = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        fail(f"curate {' '.join(beam_flags)} failed:\n{tail(log)}")
    return seconds


def same_rows(a: dict[str, dict], b: dict[str, dict]) -> bool:
    """The same uids with the same values, floats to 1e-5: RunInference sizes its batches by
    timing, and a CPU matmul over another batch size moves an embedding by ~1e-7, so two
    runners (like two runs of one) may differ in a score's last bits; every other value must
    be identical. (tests/test_portable.py compares the portable runner's rows with it.)"""
    if a.keys() != b.keys():
        return False
    for uid, row in a.items():
        other = b[uid]
        if row.keys() != other.keys():
            return False
        for key, x in row.items():
            y = other[key]
            if isinstance(x, float) and isinstance(y, float):
                if not math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6):
                    return False
            elif x != y:
                return False
    return True


def rows_of(output: Path) -> dict[str, dict[str, dict]]:
    out = {}
    for name in OUTPUTS:
        rows = {}
        for path in sorted(glob.glob(str(output / name / "*.parquet"))):
            rows.update({r["uid"]: r for r in pq.read_table(path).to_pylist()})
        out[name] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "cluster-check")
    parser.add_argument(
        "--pool-python", default=None, help="the pool's Python (default: the worker venv's)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    worker_bin = make_worker_venv(work)
    pool_bin = Path(args.pool_python).parent if args.pool_python else worker_bin
    pool_python = args.pool_python or str(worker_bin / "python")
    pool_env = {**os.environ, "PATH": f"{pool_bin}{os.pathsep}{os.environ['PATH']}"}
    pool_env.pop("PYTHONPATH", None)
    print(f"worker venv ready in {time.perf_counter() - started:.0f} s: {worker_bin.parent}")
    print(f"worker capgap: {preflight(pool_env)}")
    pattern = make_input(work / "input", args.rows)

    job_port, pool_port = free_port(), free_port()
    logs = {name: work / f"{name}.log" for name in ("job-service", "worker-pool")}
    processes: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        job_log, pool_log = (stack.enter_context(open(logs[n], "w")) for n in logs)
        stack.callback(stop, processes)  # also when a step fails
        job = subprocess.Popen(
            [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
             "--port", str(job_port)],
            stdout=job_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        processes.append(job)
        pool = subprocess.Popen(
            [pool_python, "-m", "apache_beam.runners.worker.worker_pool_main",
             "--service_port", str(pool_port)],
            stdout=pool_log, stderr=subprocess.STDOUT, env=pool_env, cwd="/",
        )  # fmt: skip
        processes.append(pool)
        wait_for_port(job_port, job, logs["job-service"], "the job service", 60)
        wait_for_port(pool_port, pool, logs["worker-pool"], "the worker pool", 60)
        print(f"job service on {job_port}, worker pool on {pool_port}")

        direct_s = curate(
            pattern, work / "direct", ["--direct_running_mode=in_memory"], work / "direct.log"
        )
        cluster_flags = [
            "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}",
        ]  # fmt: skip
        cluster_s = curate(pattern, work / "cluster", cluster_flags, work / "cluster.log")

    a, b = rows_of(work / "direct"), rows_of(work / "cluster")
    manifests = [
        json.loads((work / x / "manifest.json").read_text()) for x in ("direct", "cluster")
    ]
    same = (
        all(same_rows(a[name], b[name]) for name in OUTPUTS)
        and manifests[0]["counts"] == manifests[1]["counts"]
    )
    counts = manifests[1]["counts"]
    print(
        f"rows_in={counts['rows_in']} curated={counts['curated']} rejected={counts['rejected']} "
        f"errors={counts['errors']}; runners: {manifests[0]['runner']} / {manifests[1]['runner']}"
    )
    print(f"DirectRunner (in_memory)            {direct_s:7.1f} s")
    print(f"PortableRunner + job service + pool {cluster_s:7.1f} s  ({cluster_s / direct_s:.2f}x)")
    print(
        "rows identical: "
        + ("yes (every row and column, scores to 1e-5; counts)" if same else "NO")
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
