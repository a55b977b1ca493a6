"""Packaging: the sdist Beam ships with --setup_file carries every module and config, and
an install puts nothing generic (models/, pipeline/, transforms/) top-level."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "pipeline": "capgap/pipeline",
    "transforms": "capgap/transforms",
    "models": "capgap/models",
}


def _build(kind: str, out: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
        str(ROOT),
    ]
    if kind == "sdist":
        cmd = [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return next(out.glob("*.tar.gz" if kind == "sdist" else "*.whl"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return {"sdist": _build("sdist", out / "s"), "wheel": _build("wheel", out / "w")}


def _source_files() -> set[str]:
    files = set()
    for folder in ("pipeline", "transforms", "models", "configs", "capgap"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".yaml", ".json"} and "__pycache__" not in path.parts:
                files.add(str(path.relative_to(ROOT)))
    return files


def test_sdist_contains_every_module_and_config(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = _source_files() - names
    assert not missing, f"sdist lacks {sorted(missing)}"
    assert "setup.py" in names


def test_wheel_is_namespaced(built):
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = whl.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert not tops & {"models", "pipeline", "transforms", "configs"}, tops
    for folder, target in FOLDERS.items():
        expected = {
            f"{target}/{p.relative_to(ROOT / folder)}"
            for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert expected <= set(names), sorted(expected - set(names))
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(built["wheel"]) as whl:
        assert "capgap = capgap.pipeline.cli:entry" in whl.read(entry_points).decode()
    assert any(name.startswith("capgap/configs/models/") for name in names) or not any(
        (ROOT / "configs/models").glob("*.json")
    )


def test_console_command_help():
    out = subprocess.run(
        [sys.executable, "-m", "capgap.pipeline.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("synth", "curate", "train", "eval", "report", "demo"):
        assert command in out
    out = subprocess.run(
        [sys.executable, "-m", "capgap.pipeline.cli", "synth", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--config" in out and "--n" in out and "--set" in out


def test_cli_rejects_unknown_key_with_name(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "capgap.pipeline.cli",
            "synth",
            "--out",
            str(tmp_path),
            "--set",
            "splits.web.mismatch=0.3",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "splits.web.mismatch" in proc.stderr
