"""Driver side: match the input pattern, pick the columns, build the :class:`InputPlan`.

Globs go through Beam's ``FileSystems`` (local, ``gs://``, ...), after braceexpand-style
expansion (``shards/{00000..00099}.tar``); a folder (trailing slash or not) stands for
the data files directly inside it, and a folder written by ``datasets.save_to_disk``
(a Dataset or a DatasetDict: every split, or ``read.hf_split``) is an HF input. Side
files are skipped and listed in the plan (:func:`capgap.core.files.is_side_file`:
hidden, ``_SUCCESS``, ``*_stats.json``, ``.json`` sidecars; in a folder also files of
another format). In an img2dataset folder written in webdataset mode, ``00000.parquet``
next to ``00000.tar`` is the tar's metadata (every URL of the shard, with img2dataset's
``status`` / ``error_message``): it is not read as rows of its own (that would count the
downloaded rows twice) but is used for the rows whose download failed, which the tar
does not hold. The passthrough schema unifies the schemas of the first
``read.schema_files`` Parquet shards.

    plan = discover(ReadConfig(format="auto"), "data/synth/web/*.parquet")
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from capgap.core.files import expand_braces, is_side_file
from capgap.transforms.schema import RESERVED_COLUMNS

Format = Literal["auto", "parquet", "webdataset", "hf", "csv"]
_GLOB_CHARS = "*?["


@dataclass
class ReadConfig:
    """How to find the image, caption and uid in the input (first present name wins)."""

    format: Format = "auto"
    # A column holding bytes (or an HF {bytes, path} struct) is read as image bytes;
    # a column holding text is read as an image path.
    image_columns: list[str] = field(
        default_factory=lambda: [
            "image",
            "jpg",
            "png",
            "webp",
            "image_path",
            "path",
            "filepath",
            "file_name",
        ]
    )
    caption_columns: list[str] = field(default_factory=lambda: ["caption", "text", "txt"])
    uid_columns: list[str] = field(default_factory=lambda: ["uid", "key", "id"])
    # Image paths are resolved against this root and must stay inside it; default:
    # the folder of the shard that names them.
    image_root: str | None = None
    csv_delimiter: str | None = None  # default: tab for .tsv, comma otherwise
    hf_split: str | None = None  # one split of a DatasetDict saved on disk (default: all)
    # img2dataset's per-row download outcome: a row whose status column holds anything but
    # one of status_ok goes to errors/ as source_failed with the message column's text
    # (read only where a shard has both columns).
    status_column: str = "status"
    status_message_column: str = "error_message"
    status_ok: list[str] = field(default_factory=lambda: ["success"])
    hf_rows_per_task: int = 10000  # an HF dataset is read in index ranges of this size
    batch_rows: int = 512  # rows converted from Arrow at a time
    schema_files: int = 64  # shards whose schemas are unified into the passthrough schema

    def __post_init__(self) -> None:
        if not self.image_columns or not self.caption_columns:
            raise ValueError("read.image_columns and read.caption_columns must not be empty")
        if self.hf_rows_per_task < 1 or self.batch_rows < 1 or self.schema_files < 1:
            raise ValueError("read.hf_rows_per_task, batch_rows, schema_files must be >= 1")


@dataclass(frozen=True)
class InputPlan:
    """What :func:`discover` found: shards, chosen columns and the passthrough schema."""

    pattern: str
    format: str
    base_dir: str
    files: tuple[tuple[str, int, float], ...]  # (path, size in bytes, mtime)
    image_column: str | None
    caption_column: str | None
    uid_column: str | None
    passthrough: pa.Schema  # the other input columns, renamed (see RESERVED_COLUMNS), nullable
    passthrough_sources: tuple[str, ...]  # input name of each passthrough field, in order
    config: ReadConfig = dataclasses.field(default_factory=ReadConfig)
    hf_rows: int = 0
    hf_splits: tuple[tuple[str, int], ...] = ()  # (split, rows); ("", rows) for a Dataset
    # (tar path, metadata Parquet path, its size, mtime) of img2dataset webdataset shards
    sidecars: tuple[tuple[str, str, int, float], ...] = ()
    skipped: tuple[str, ...] = ()  # side files matched but not read

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, mtime) of every input file, in order (HF: every
        file of the folder, Arrow data included; webdataset: the metadata Parquets too)."""
        digest = hashlib.sha256(self.format.encode())
        listed = list(self.files) + [(meta, size, mtime) for _, meta, size, mtime in self.sidecars]
        for path, size, mtime in listed:
            digest.update(f"{relative_name(path, self.base_dir)}\0{size}\0{mtime}\n".encode())
        return digest.hexdigest()

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.files)

    def sidecar(self, path: str) -> str | None:
        """The img2dataset metadata Parquet of a tar shard, if there is one."""
        return next((meta for tar, meta, _, _ in self.sidecars if tar == path), None)

    def hf_source(self, split: str) -> str:
        """The ``source`` of rows of one split (the folder name, then ``/split``)."""
        name = posixpath.basename(self.pattern.rstrip("/"))
        return f"{name}/{split}" if split else name


def pattern_base(pattern: str) -> str:
    """The folder part of a pattern before its first glob or brace character."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS + "{" if c in pattern), default=-1)
    head = pattern if cut < 0 else pattern[:cut]
    if cut < 0 and not head.endswith("/"):
        return posixpath.dirname(head.rstrip("/")) or "."
    return head[: head.rfind("/") + 1].rstrip("/") or "."


def relative_name(path: str, base_dir: str) -> str:
    """``path`` relative to ``base_dir`` when inside it, else the path itself."""
    base = base_dir.rstrip("/") + "/"
    return path[len(base) :] if path.startswith(base) else path


def _is_hf_dir(path: str) -> bool:
    return any(
        FileSystems.exists(posixpath.join(path, name))
        for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _is_folder(path: str) -> bool:
    """A folder, not a file (object stores: a prefix with objects under it)."""
    if any(c in path for c in _GLOB_CHARS):
        return False
    path = path.rstrip("/")
    if "://" not in path:
        return os.path.isdir(path)
    try:
        if _match(path):
            return False
        return bool(_match(path + "/*"))
    except (OSError, ValueError):
        return False


def _match(pattern: str) -> list[tuple[str, int, float]]:
    try:
        result = FileSystems.match([pattern])[0]
    except (OSError, ValueError):  # Beam raises BeamIOError (an IOError) for no match
        return []
    files = [
        (m.path, int(m.size_in_bytes or 0), float(m.last_updated_in_seconds or 0.0))
        for m in result.metadata_list
    ]
    return sorted(files)


def guess_format(path: str) -> str:
    fmt = _suffix_format(path)
    if fmt is None:
        raise ValueError(f"cannot tell the input format of {path!r}; set read.format")
    return fmt


def _suffix_format(path: str) -> str | None:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return "csv"
    return None


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if name.lower().endswith(suffix):
            return path[: len(path) - len(suffix)]
    return path


File = tuple[str, int, float]


def _expand(pattern: str) -> tuple[list[File], list[File], list[str], str]:
    """(data files, files from folders, side files, base folder) of a pattern: brace
    alternatives each matched (each must match something), folders listed one level deep.
    A file named explicitly is never a side file."""
    alternatives = expand_braces(pattern)
    files: dict[str, File] = {}
    from_folders: dict[str, File] = {}
    skipped: list[str] = []
    for alt in alternatives:
        folder = _is_folder(alt)
        hits = _match(alt.rstrip("/") + "/*") if folder else _match(alt)
        if not hits:
            where = "" if alt == pattern else f" (from {pattern!r})"
            kind = "folder" if folder else "input pattern"
            raise ValueError(f"{kind} {alt!r}{where} matched no files")
        literal = not folder and not any(c in alt for c in _GLOB_CHARS)
        for hit in hits:
            if not literal and is_side_file(hit[0]):
                skipped.append(hit[0])
            else:
                (from_folders if folder else files)[hit[0]] = hit
    if len(alternatives) == 1 and _is_folder(pattern):
        base = pattern.rstrip("/") or "/"
    else:
        base = pattern_base(pattern)
    return sorted(files.values()), sorted(from_folders.values()), sorted(skipped), base


def _choose(
    fmt: str, files: list[File], from_folders: list[File], pattern: str
) -> tuple[str, list[File], list[File], list[str]]:
    """(format, data files, img2dataset metadata Parquets, skipped paths) of the matches.

    Auto: the format of the suffixes; a file of unknown suffix matched by a glob is an
    error, one found in a folder is skipped. A set format reads files of its own suffix
    and, matched by a glob, files of unknown suffix (the setting says what they are);
    files of another format are skipped. A Parquet with the stem of a tar next to it is
    that tar's img2dataset metadata (webdataset only).
    """
    named = {p for p, _, _ in files}
    candidates = files + from_folders
    tar_stems = {_stem(p) for p, _, _ in candidates if _suffix_format(p) == "webdataset"}
    metadata = [
        f for f in candidates if _suffix_format(f[0]) == "parquet" and _stem(f[0]) in tar_stems
    ]
    meta_paths = {p for p, _, _ in metadata}
    if fmt == "auto":
        for path in named:
            guess_format(path)  # raises for a file of unknown format matched by a glob
        formats = {_suffix_format(p) for p, _, _ in candidates if p not in meta_paths} - {None}
        if len(formats) > 1:
            raise ValueError(f"{pattern!r} mixes formats {sorted(formats)}; narrow the glob")
        if not formats:
            raise ValueError(f"{pattern!r} holds no data files (Parquet, tar, CSV/TSV)")
        fmt = formats.pop()
    if fmt != "webdataset":
        metadata, meta_paths = [], set()
    keep = [
        f
        for f in candidates
        if f[0] not in meta_paths
        and (_suffix_format(f[0]) == fmt or (_suffix_format(f[0]) is None and f[0] in named))
    ]
    kept = {p for p, _, _ in keep} | meta_paths
    skipped = [p for p, _, _ in candidates if p not in kept]
    return fmt, sorted(keep), sorted(metadata), sorted(skipped)


def _first_present(candidates: list[str], names: list[str]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _passthrough(schema: pa.Schema, skip: set[str]) -> tuple[pa.Schema, tuple[str, ...]]:
    fields, sources = [], []
    for f in schema:
        if f.name in skip:
            continue
        name = f"input_{f.name}" if f.name in RESERVED_COLUMNS else f.name
        fields.append(pa.field(name, f.type, nullable=True))
        sources.append(f.name)
    return pa.schema(fields), tuple(sources)


def _unify(schemas: list[pa.Schema]) -> pa.Schema:
    """Union of shard schemas; a field whose types cannot be reconciled becomes a string."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        by_name: dict[str, list[pa.DataType]] = {}
        for schema in schemas:
            for f in schema:
                by_name.setdefault(f.name, []).append(f.type)
        fields = []
        for name, types in by_name.items():
            try:
                merged = pa.unify_schemas(
                    [pa.schema([pa.field(name, t)]) for t in types], promote_options="permissive"
                ).field(name)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                merged = pa.field(name, pa.large_string())
            fields.append(merged)
        return pa.schema(fields)


def _read_parquet_schema(path: str) -> pa.Schema | None:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as fh:
            return pq.read_schema(fh)
    except (OSError, pa.ArrowException, ValueError):
        return None  # an unreadable shard; the reader reports it per shard


def text_lines(fh: Any) -> Iterator[str]:
    """Lines of a binary file-like, newline kept, undecodable bytes as surrogates, a leading
    byte-order mark dropped.

    Works on anything with ``readline`` (Beam's compressed-file wrappers for ``.gz``
    are not io.BufferedIOBase, so io.TextIOWrapper cannot sit on them).
    """
    first = True
    while True:
        line = fh.readline()
        if not line:
            return
        if first and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark ("CSV UTF-8" from spreadsheets)
        first = False
        yield line.decode("utf-8", errors="surrogateescape")


def _csv_header(path: str, cfg: ReadConfig) -> list[str] | None:
    try:
        with FileSystems.open(path) as fh:
            return next(csv.reader(text_lines(fh), delimiter=csv_delimiter(path, cfg)), None)
    except (OSError, csv.Error, UnicodeError, EOFError, zlib.error):
        return None


def csv_delimiter(path: str, cfg: ReadConfig) -> str:
    if cfg.csv_delimiter:
        return cfg.csv_delimiter
    return "\t" if ".tsv" in path.lower() else ","


def discover(cfg: ReadConfig, pattern: str) -> InputPlan:
    """Match the input, pick the image / caption / uid columns, build the passthrough schema."""
    if not pattern:
        raise ValueError("no input given (set input)")
    fmt = cfg.format
    stripped = pattern.rstrip("/") or "/"
    if fmt == "hf" or (fmt == "auto" and not any(c in pattern for c in _GLOB_CHARS + "{")):
        if _is_hf_dir(stripped):
            return _discover_hf(cfg, stripped)
        if fmt == "hf":
            raise ValueError(f"{pattern!r} is not a datasets.save_to_disk folder")
    named, from_folders, side, base = _expand(pattern)
    fmt, files, metadata, skipped = _choose(fmt, named, from_folders, pattern)
    if not files:
        raise ValueError(
            f"{pattern!r} holds no {fmt} files"
            + (
                f" (skipped: {', '.join(relative_name(p, base) for p in side + skipped)})"
                if side or skipped
                else ""
            )
        )
    sidecars = _pair_metadata(files, metadata)
    if fmt == "parquet":
        schemas = [
            s for s in (_read_parquet_schema(p) for p, _, _ in files[: cfg.schema_files]) if s
        ]
        if not schemas:  # every sampled shard unreadable: read them anyway, each gets an error
            schemas = [pa.schema([])]
        schema = _unify(schemas)
        names = schema.names
    elif fmt == "csv":
        header = next((h for h in (_csv_header(p, cfg) for p, _, _ in files[:8]) if h), [])
        names = list(dict.fromkeys(header))
        schema = pa.schema([pa.field(n, pa.large_string()) for n in names])
    elif fmt == "webdataset":
        names = ["meta_json"]
        schema = pa.schema([pa.field("meta_json", pa.large_string())])
    else:
        raise ValueError(f"unknown input format {fmt!r}")
    image_col = _first_present(cfg.image_columns, names) if fmt != "webdataset" else None
    caption_col = _first_present(cfg.caption_columns, names) if fmt != "webdataset" else None
    uid_col = _first_present(cfg.uid_columns, names) if fmt != "webdataset" else None
    skip = {c for c in (image_col, caption_col, uid_col) if c}
    passthrough, sources = _passthrough(schema, skip)
    return InputPlan(
        pattern=pattern,
        format=fmt,
        base_dir=base,
        files=tuple(files),
        image_column=image_col,
        caption_column=caption_col,
        uid_column=uid_col,
        passthrough=passthrough,
        passthrough_sources=sources,
        config=cfg,
        sidecars=sidecars,
        skipped=tuple(relative_name(p, base) for p in sorted(side + skipped)),
    )


def _pair_metadata(
    files: list[File], metadata: list[File]
) -> tuple[tuple[str, str, int, float], ...]:
    by_stem = {_stem(p): (p, size, mtime) for p, size, mtime in metadata}
    pairs = []
    for path, _, _ in files:
        meta = by_stem.get(_stem(path))
        if meta is not None:
            pairs.append((path, *meta))
    return tuple(pairs)


def _discover_hf(cfg: ReadConfig, path: str) -> InputPlan:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split is not None and cfg.hf_split not in ds:
            raise ValueError(f"{path}: no split {cfg.hf_split!r} (read.hf_split; has {list(ds)})")
        names_ = [cfg.hf_split] if cfg.hf_split is not None else list(ds)
        splits = tuple((name, len(ds[name])) for name in names_)
        schema = _unify([ds[name].features.arrow_schema for name in names_])
    else:
        if cfg.hf_split is not None:
            raise ValueError(f"{path} holds one dataset, not splits: unset read.hf_split")
        splits = (("", len(ds)),)
        schema = ds.features.arrow_schema
    names = schema.names
    image_col = _first_present(cfg.image_columns, names)
    caption_col = _first_present(cfg.caption_columns, names)
    uid_col = _first_present(cfg.uid_columns, names)
    passthrough, sources = _passthrough(schema, {c for c in (image_col, caption_col, uid_col) if c})
    return InputPlan(
        pattern=path,
        format="hf",
        base_dir=posixpath.dirname(path),
        files=tuple(_tree(path)) or ((path, 0, 0.0),),
        image_column=image_col,
        caption_column=caption_col,
        uid_column=uid_col,
        passthrough=passthrough,
        passthrough_sources=sources,
        config=cfg,
        hf_rows=sum(n for _, n in splits),
        hf_splits=splits,
    )


def _tree(path: str) -> list[File]:
    """Every file under a folder (the Arrow data of each split included), sorted."""
    if "://" in path:
        return _match(path.rstrip("/") + "/**")
    files = []
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            stat = os.stat(full)
            files.append((full, stat.st_size, stat.st_mtime))
    return sorted(files)


def input_layout(plan: InputPlan) -> dict[str, Any]:
    """What the manifest says about the input beyond its files: HF splits read, side files
    skipped, img2dataset metadata used."""
    out: dict[str, Any] = {}
    if plan.hf_splits:
        out["splits"] = {split or "(dataset)": rows for split, rows in plan.hf_splits}
    if plan.sidecars:
        out["metadata_files"] = [
            relative_name(meta, plan.base_dir) for _, meta, _, _ in plan.sidecars
        ]
    if plan.skipped:
        out["skipped_files"] = list(plan.skipped[:100])
        out["skipped_count"] = len(plan.skipped)
    return out
