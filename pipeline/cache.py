"""``capgap cache``: what a curate cache holds, and pruning it.

The cache (``capgap curate --cache PREFIX``, layout in :mod:`capgap.transforms.cache`) keeps
entries per *space*: one kind (embeddings, captions, gate scores) made under one set of
settings (model fingerprint, preprocessing, generation settings).

    capgap cache stats PREFIX [--json]
        per space: kind, model, builds that wrote it, part files, entries (Parquet footers),
        bytes, last build; plus files no commit record names (killed builds)
    capgap cache prune PREFIX [--keep-latest N] [--older-than DAYS] [--dry-run]
        --keep-latest N: drop the spaces none of the N latest builds used (models and
          settings no longer in use); --older-than DAYS: drop what builds finished more than
          DAYS ago wrote; always: files of builds that never committed, once their build id
          is older than --orphan-hours (default 24; a running build's files are younger)

Prune rewrites or removes commit records first, then deletes files, so a build that starts
meanwhile never reads a file that is about to go; do not prune while a build runs.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import posixpath
import sys
import time
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capgap.transforms.cache import KINDS, read_commits, relative
from capgap.transforms.write import write_json


def _list(prefix: str) -> dict[str, int]:
    """{relative path: bytes} of every file under the cache's entry folders."""
    out: dict[str, int] = {}
    for kind in KINDS:
        pattern = posixpath.join(prefix, kind, "**")
        # A missing folder matches nothing; any error (permissions, credentials) propagates.
        matches = FileSystems.match([pattern])[0].metadata_list
        for meta in matches:
            out[relative(meta.path, prefix)] = meta.size_in_bytes
    return out


def _rows(path: str) -> int:
    with FileSystems.open(path) as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def _model_label(settings: dict[str, Any]) -> str:
    model = settings.get("model") or settings.get("captioner") or {}
    name = model.get("architecture") or model.get("hub_id") or "captioner"
    digest = model.get("sha256") or model.get("fingerprint") or model.get("revision") or "-"
    return f"{name}@{str(digest)[:12]}"


def stats(prefix: str) -> dict[str, Any]:
    """{"spaces": {kind/fingerprint: {...}}, "uncommitted": {files, bytes}, "totals": {...}}."""
    prefix = prefix.rstrip("/")
    commits = read_commits(prefix)
    present = _list(prefix)
    spaces: dict[str, dict[str, Any]] = {}
    named: set[str] = set()
    for record in commits:
        for name, entry in record.get("spaces", {}).items():
            space = spaces.setdefault(
                name,
                {
                    "kind": name.split("/", 1)[0],
                    "model": _model_label(entry.get("settings", {})),
                    "settings": entry.get("settings", {}),
                    "builds": 0,
                    "files": 0,
                    "entries": 0,
                    "bytes": 0,
                    "last_build": None,
                },
            )
            space["builds"] += 1
            space["last_build"] = record.get("build_id")
            for rel in entry.get("files", []):
                if rel not in present:
                    continue  # pruned or lost: nothing to count
                named.add(rel)
                space["files"] += 1
                space["bytes"] += present[rel]
                space["entries"] += _rows(posixpath.join(prefix, rel))
    stray = {rel: size for rel, size in present.items() if rel not in named}
    return {
        "prefix": prefix,
        "builds": len(commits),
        "spaces": spaces,
        "uncommitted": {"files": len(stray), "bytes": sum(stray.values())},
        "totals": {
            "entries": sum(s["entries"] for s in spaces.values()),
            "bytes": sum(present.values()),
        },
    }


def _build_time(build_id: str) -> float | None:
    """Seconds since the epoch from a build id's leading UTC stamp (None if it has none)."""
    try:
        return calendar.timegm(time.strptime(build_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return None


def prune(
    prefix: str,
    keep_latest: int | None = None,
    older_than_days: float | None = None,
    orphan_hours: float = 24.0,
    dry_run: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """Drop spaces unused by the ``keep_latest`` latest builds, builds older than
    ``older_than_days``, and uncommitted files older than ``orphan_hours``. Returns what went."""
    prefix = prefix.rstrip("/")
    now = time.time() if now is None else now
    commits = read_commits(prefix)
    keep_spaces = None
    if keep_latest is not None:
        keep_spaces = {name for c in commits[-keep_latest:] for name in c.get("spaces", {})}
    dropped_commits, rewritten, dropped_spaces = [], [], set()
    for record in commits:
        finished = record.get("finished_at")
        age_days = (
            (now - calendar.timegm(time.strptime(finished, "%Y-%m-%dT%H:%M:%SZ"))) / 86400
            if finished
            else 0.0
        )
        spaces = dict(record.get("spaces", {}))
        if older_than_days is not None and age_days > older_than_days:
            dropped_commits.append(record)
            continue
        if keep_spaces is not None:
            gone = [name for name in spaces if name not in keep_spaces]
            if gone:
                dropped_spaces.update(gone)
                for name in gone:
                    del spaces[name]
                rewritten.append((record, spaces))
    kept_files = set()
    dropped_ids = {r["build_id"] for r in dropped_commits}
    for record in commits:
        if record["build_id"] in dropped_ids:
            continue
        spaces = next((s for r, s in rewritten if r is record), record.get("spaces", {}))
        for entry in spaces.values():
            kept_files.update(entry.get("files", []))
    committed_ids = {r["build_id"] for r in commits}
    doomed = []
    for rel in _list(prefix):
        if rel in kept_files:
            continue
        parts = rel.split("/")
        build_id = parts[2] if len(parts) > 3 else ""
        if build_id in committed_ids:
            doomed.append(rel)  # written by a build whose entries (or this space) are dropped
            continue
        started = _build_time(build_id)
        if started is None or now - started > orphan_hours * 3600:
            doomed.append(rel)
    report = {
        "dropped_builds": sorted(dropped_ids),
        "dropped_spaces": sorted(dropped_spaces),
        "deleted_files": len(doomed),
        "dry_run": dry_run,
    }
    if dry_run:
        return report
    # Commit records first: from here on no new build reads the doomed files.
    for record in dropped_commits:
        FileSystems.delete([record["_path"]])
    for record, spaces in rewritten:
        if record["build_id"] in dropped_ids:
            continue
        body = {k: v for k, v in record.items() if k != "_path"}
        body["spaces"] = spaces
        write_json(record["_path"], body)
    if doomed:
        FileSystems.delete([posixpath.join(prefix, rel) for rel in doomed])
    _remove_empty_dirs(prefix)
    return report


def _remove_empty_dirs(prefix: str) -> None:
    """Local caches: folders the deletions emptied (object stores have none)."""
    if "://" in prefix or not os.path.isdir(prefix):
        return
    for kind in KINDS:
        root = os.path.join(prefix, kind)
        for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
            if folder != root and not os.listdir(folder):
                os.rmdir(folder)


def _print_stats(report: dict[str, Any]) -> None:
    print(f"cache {report['prefix']}: {report['builds']} builds")
    rows = sorted(report["spaces"].items())
    header = ("space", "kind", "model", "builds", "files", "entries", "bytes", "last build")
    table = [header] + [
        (
            name.split("/", 1)[1],
            s["kind"],
            s["model"],
            str(s["builds"]),
            str(s["files"]),
            str(s["entries"]),
            str(s["bytes"]),
            s["last_build"] or "-",
        )
        for name, s in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print(("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip())
    totals, stray = report["totals"], report["uncommitted"]
    print(f"total: {totals['entries']} entries, {totals['bytes']} bytes")
    print(
        f"uncommitted (killed builds, never read): {stray['files']} files, {stray['bytes']} bytes"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="capgap cache", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_stats = sub.add_parser("stats", help="entries, bytes and builds per model / settings")
    p_stats.add_argument("prefix", help="the cache prefix (curate's --cache)")
    p_stats.add_argument("--json", action="store_true", help="print the report as JSON")
    p_prune = sub.add_parser("prune", help="drop unused spaces, old builds, uncommitted files")
    p_prune.add_argument("prefix", help="the cache prefix (curate's --cache)")
    p_prune.add_argument(
        "--keep-latest", type=int, default=None, help="keep only spaces the N latest builds used"
    )
    p_prune.add_argument(
        "--older-than", type=float, default=None, help="drop builds finished over DAYS ago"
    )
    p_prune.add_argument("--orphan-hours", type=float, default=24.0)
    p_prune.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.action == "stats":
        report = stats(args.prefix)
        if not report["builds"] and not report["totals"]["bytes"]:
            print(f"capgap cache: no cache at {args.prefix}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_stats(report)
        return 0
    if args.keep_latest is not None and args.keep_latest < 1:
        print("capgap cache: --keep-latest must be >= 1", file=sys.stderr)
        return 2
    report = prune(args.prefix, args.keep_latest, args.older_than, args.orphan_hours, args.dry_run)
    verb = "would drop" if args.dry_run else "dropped"
    print(
        f"{verb}: {len(report['dropped_builds'])} builds, {len(report['dropped_spaces'])} "
        f"spaces, {report['deleted_files']} files"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
