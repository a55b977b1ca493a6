"""Driver side: match the input pattern, pick the columns, build the :class:`InputPlan`.

Globs go through Beam's ``FileSystems`` (local, ``gs://``, ...); a folder written by
``datasets.save_to_disk`` is an HF input. The passthrough schema unifies the schemas of
the first ``read.schema_files`` Parquet shards.

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
    hf_split: str | None = None  # for a DatasetDict saved on disk
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

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, mtime) of every input shard, in order."""
        digest = hashlib.sha256(self.format.encode())
        for path, size, mtime in self.files:
            digest.update(f"{relative_name(path, self.base_dir)}\0{size}\0{mtime}\n".encode())
        return digest.hexdigest()

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.files)


def pattern_base(pattern: str) -> str:
    """The folder part of a pattern before its first glob character."""
    cut = min((pattern.find(c) for c in _GLOB_CHARS if c in pattern), default=-1)
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


def _match(pattern: str) -> list[tuple[str, int, float]]:
    result = FileSystems.match([pattern])[0]
    files = [
        (m.path, int(m.size_in_bytes or 0), float(m.last_updated_in_seconds or 0.0))
        for m in result.metadata_list
    ]
    return sorted(files)


def guess_format(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return "csv"
    raise ValueError(f"cannot tell the input format of {path!r}; set read.format")


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
    stripped = pattern.rstrip("/")
    if fmt == "hf" or (fmt == "auto" and not any(c in pattern for c in _GLOB_CHARS)):
        if _is_hf_dir(stripped):
            return _discover_hf(cfg, stripped)
        if fmt == "hf":
            raise ValueError(f"{pattern!r} is not a datasets.save_to_disk folder")
    files = _match(pattern)
    if not files:
        raise ValueError(f"input pattern {pattern!r} matched no files")
    if fmt == "auto":
        formats = {guess_format(path) for path, _, _ in files}
        if len(formats) > 1:
            raise ValueError(f"{pattern!r} mixes formats {sorted(formats)}; narrow the glob")
        fmt = formats.pop()
    base = pattern_base(pattern)
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
    )


def _discover_hf(cfg: ReadConfig, path: str) -> InputPlan:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        split = cfg.hf_split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has {list(ds)})")
        ds = ds[split]
    schema = ds.features.arrow_schema
    names = schema.names
    image_col = _first_present(cfg.image_columns, names)
    caption_col = _first_present(cfg.caption_columns, names)
    uid_col = _first_present(cfg.uid_columns, names)
    passthrough, sources = _passthrough(schema, {c for c in (image_col, caption_col, uid_col) if c})
    files = []
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            stat = os.stat(full)
            files.append((full, stat.st_size, stat.st_mtime))
    return InputPlan(
        pattern=path,
        format="hf",
        base_dir=posixpath.dirname(path),
        files=tuple(files) or ((path, 0, 0.0),),
        image_column=image_col,
        caption_column=caption_col,
        uid_column=uid_col,
        passthrough=passthrough,
        passthrough_sources=sources,
        config=cfg,
        hf_rows=len(ds),
    )
