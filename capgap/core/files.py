"""File patterns: brace expansion, side files, and local glob / folder expansion.

A pattern is a glob (``**`` recursive), a file, or a folder standing for the files with
the given suffix directly inside it; several patterns may be joined by commas (outside
braces), and each may hold braceexpand-style alternatives and ranges
(``shards/{00000..00099}.tar``, ``{train,val}/*.parquet``), as webdataset writes them.
Side files (hidden, ``_``-prefixed such as ``_SUCCESS``, ``.json`` sidecars such as
img2dataset's ``00000_stats.json``) are never data. The curate pipeline matches through
Beam's ``FileSystems`` instead (any filesystem), in
:mod:`capgap.transforms.readers.discover`, with the same brace expansion and side-file rule.

    expand_paths("data/synth/web/*.parquet")           # sorted list of Paths
    expand_paths("runs/a/shards,extra.parquet")       # a folder and a file
    expand_braces("s/{000..002}.tar")                  # ["s/000.tar", "s/001.tar", "s/002.tar"]
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

#: Suffixes of files that sit next to data shards and are never data themselves.
SIDE_SUFFIXES = (".json", ".crc", ".md", ".lock", ".tmp")


def is_side_file(path: str) -> bool:
    """Hidden (``.x``), ``_``-prefixed (``_SUCCESS``, ``_metadata``) or a sidecar suffix
    (``.json``: img2dataset's ``_stats.json``, HF's ``dataset_info.json``; ``.crc``)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.startswith((".", "_")) or name.lower().endswith(SIDE_SUFFIXES)


def expand_braces(pattern: str) -> list[str]:
    """braceexpand's expansion of ``{a,b}`` and ``{00..99}`` (zero padding kept); a pattern
    without braces is returned as is."""
    if "{" not in pattern:
        return [pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def split_patterns(patterns: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (blank entries dropped; a comma inside
    braces, ``{a,b}``, does not split)."""
    if isinstance(patterns, str | os.PathLike):
        patterns = _split_outside_braces(str(patterns))
    return [str(p).strip() for p in patterns if str(p).strip()]


def _split_outside_braces(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


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
    schema), side files (:func:`is_side_file`) left out. Raises ``FileNotFoundError``
    naming the first pattern (or brace alternative) that matches nothing, unless
    ``allow_empty``.
    """
    files: set[str] = set()
    for pattern in split_patterns(patterns):
        for alternative in expand_braces(pattern):
            matched: list[str] = []
            for hit in glob.glob(os.path.expanduser(alternative), recursive=True):
                if os.path.isdir(hit):
                    inside = glob.glob(os.path.join(glob.escape(hit), f"*{suffix}"))
                    matched += [f for f in inside if not is_side_file(f)]
                else:
                    matched.append(hit)
            if not matched and not allow_empty:
                where = "" if alternative == pattern else f" (from {pattern!r})"
                raise FileNotFoundError(f"no {_kind(suffix)}files match {alternative!r}{where}")
            files.update(matched)
    return [Path(f) for f in sorted(files)]
