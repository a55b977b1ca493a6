"""Local file patterns -> files: the one place capgap expands globs outside Beam.

A pattern is a glob (``**`` recursive), a file, or a folder standing for the files with
the given suffix directly inside it; several patterns may be joined by commas. The
curate pipeline reads through Beam's ``FileSystems`` instead (any filesystem), in
:mod:`capgap.transforms.readers.discover`.

    expand_paths("data/synth/web/*.parquet")           # sorted list of Paths
    expand_paths("runs/a/shards,extra.parquet")       # a folder and a file
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path


def split_patterns(patterns: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (blank entries dropped)."""
    if isinstance(patterns, str | os.PathLike):
        patterns = str(patterns).split(",")
    return [str(p).strip() for p in patterns if str(p).strip()]


def _kind(suffix: str) -> str:
    """``".parquet"`` -> ``"Parquet "`` (for messages); ``""`` -> ``""``."""
    name = suffix.lstrip(".")
    return "Parquet " if name == "parquet" else f"{name} " if name else ""


def expand_paths(
    patterns: str | os.PathLike | Sequence[str],
    suffix: str = ".parquet",
    allow_empty: bool = False,
) -> list[Path]:
    """Sorted, de-duplicated files matching the patterns.

    A folder stands for the ``*{suffix}`` files directly inside it (not below: a curate
    output folder holds ``curated/``, ``rejected/`` and ``errors/``, which differ in
    schema). Raises ``FileNotFoundError`` naming the first pattern that matches nothing,
    unless ``allow_empty``.
    """
    files: set[str] = set()
    for pattern in split_patterns(patterns):
        matched: list[str] = []
        for hit in glob.glob(os.path.expanduser(pattern), recursive=True):
            if os.path.isdir(hit):
                matched += glob.glob(os.path.join(glob.escape(hit), f"*{suffix}"))
            else:
                matched.append(hit)
        if not matched and not allow_empty:
            raise FileNotFoundError(f"no {_kind(suffix)}files match {pattern!r}")
        files.update(matched)
    return [Path(f) for f in sorted(files)]
