"""Check capgap's import layers with import-linter (the contracts are in pyproject.toml).

setup.py installs the top-level folders as ``capgap.pipeline``, ``capgap.transforms``,
``capgap.models`` and ``capgap.configs`` (``package_dir``), so in the repository the
``capgap`` package's folder holds only ``capgap.core``; import-linter's graph builder walks
a package's own folder and would see nothing else. This script lays the installed shape
out under ``build/import-graph/capgap/`` (symlinks, or copies with ``--copy``) and runs
``lint-imports`` there. ``make lint`` runs it; exit status 1 when a contract is broken.

    python tools/lint_imports.py
    python tools/lint_imports.py --copy --dest /tmp/graph   # a copy you may edit
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Subpackage -> folder, as setup.py's package_dir maps them (the rest of capgap/ as is).
MAPPED = {
    "pipeline": "pipeline",
    "transforms": "transforms",
    "models": "models",
    "configs": "configs",
}


def lay_out(dest: Path, root: Path = ROOT, copy: bool = False) -> Path:
    """Build ``dest/capgap`` in the installed shape; returns ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    package = dest / "capgap"
    package.mkdir(parents=True)
    entries = {p.name: p for p in (root / "capgap").iterdir() if p.name != "__pycache__"}
    entries.update({name: root / folder for name, folder in MAPPED.items()})
    for name, source in entries.items():
        target = package / name
        if not copy:
            target.symlink_to(source.resolve())
        elif source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return dest


def lint(dest: Path, config: Path = ROOT / "pyproject.toml") -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on the tree at ``dest``; output captured."""
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe) if exe.exists() else "lint-imports", str(config), "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(dest)}
    return subprocess.run(command, cwd=dest, env=env, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "build" / "import-graph")
    parser.add_argument("--copy", action="store_true", help="copy the files instead of linking")
    args = parser.parse_args(argv)
    result = lint(lay_out(args.dest, copy=args.copy))
    output = result.stdout + result.stderr
    # import-linter prints a banner first; the verdicts follow it.
    print(output[output.find("Contracts") :] if "Contracts" in output else output, end="")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
