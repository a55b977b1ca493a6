"""Readers for ``capgap curate``: Parquet, WebDataset tar, HF ``datasets`` on disk, CSV/TSV.

Each reader turns its shards into ``(uid, record)`` pairs, one per input row, where
``record`` is a plain dict (see :func:`make_record`): the uid, the source shard and
row index, the image as bytes or as a path, the raw caption (text, bytes or
whatever the cell held) and the row's other columns (``columns``), typed by the
passthrough schema the plan discovered. Readers never crash on bad input: an
unreadable shard, a corrupt tar member, a missing column or a column of the wrong
type becomes a record that carries an ``error`` (a reason code from
:mod:`capgap.transforms.reasons`), which decoding routes to ``errors/``.

Two lighter modes serve ``capgap curate``'s side passes (``transforms/bank.py``):
``index_only`` emits ``(uid, (source, index))`` from as little of each shard as the uids
need (Parquet: the uid column alone), and ``select`` reads only the records at given refs
(Parquet and HF skip the other rows before converting them to Python). Both see the same
uid for every record as a full read, bad rows included.

Paths are anything Beam's ``FileSystems`` understands (local, ``gs://``, ...), with
globs. The uid is taken from the first present column of ``read.uid_columns``
(``uid``, ``key``, ...), else derived from the shard's path relative to the
input pattern's folder plus the row index (``web-00000-of-00004.parquet#17``).

    plan = discover(ReadConfig(), "data/synth/web/*.parquet")
    records = pipeline | ReadRecords(plan)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from capgap.transforms.reasons import Reason, exception_message
from capgap.transforms.schema import RESERVED_COLUMNS

Format = Literal["auto", "parquet", "webdataset", "hf", "csv"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
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


# --- discovery (driver side) -----------------------------------------------------------------


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
    """Lines of a binary file-like, newline kept, undecodable bytes as surrogates.

    Works on anything with ``readline`` (Beam's compressed-file wrappers for ``.gz``
    are not io.BufferedIOBase, so io.TextIOWrapper cannot sit on them).
    """
    while True:
        line = fh.readline()
        if not line:
            return
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


# --- records ---------------------------------------------------------------------------------


def derived_uid(source: str, index: int) -> str:
    return f"{source}#{index}"


def make_record(
    *,
    uid: str,
    source: str,
    index: int,
    image: bytes | None = None,
    image_path: str | None = None,
    caption: Any = None,
    columns: dict[str, Any] | None = None,
    image_root: str | None = None,
    error: tuple[str, str, str] | None = None,
) -> dict[str, Any]:
    """One raw input record. ``error`` = (reason code, error class, message) when reading failed."""
    return {
        "uid": uid,
        "source": source,
        "source_index": int(index),
        "image": image,
        "image_path": image_path,
        "caption": caption,
        "columns": columns or {},
        "image_root": image_root,
        "error": error,
    }


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _make_encodable(record: dict[str, Any]) -> None:
    """Text holding lone surrogates (undecodable bytes read with surrogateescape) cannot
    cross a Beam coder: captions and paths go back to their raw bytes (decode then names
    the problem), identifiers and passthrough values are backslash-escaped."""
    for key in ("caption", "image_path"):
        value = record[key]
        if isinstance(value, str) and not _is_utf8(value):
            record[key] = value.encode("utf-8", "surrogateescape")
    for key in ("uid", "source"):
        if not _is_utf8(record[key]):
            record[key] = _escaped(record[key])
    columns = record["columns"]
    for key, value in columns.items():
        if isinstance(value, str) and not _is_utf8(value):
            columns[key] = _escaped(value)
    if record["error"] is not None:
        record["error"] = tuple(
            v if not isinstance(v, str) or _is_utf8(v) else _escaped(v) for v in record["error"]
        )


def _pylist(column: pa.ChunkedArray | pa.Array, raw: bool = False) -> list:
    """``to_pylist``, surviving invalid UTF-8 in string columns (as bytes when ``raw``,
    else backslash-escaped text)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = column.cast(pa.large_binary()).to_pylist()
        if raw:
            return values
        return [None if v is None else v.decode("utf-8", "backslashreplace") for v in values]


def _error(reason: Reason, err: BaseException | str, error_class: str | None = None):
    """(reason, error class, message); reprs with memory addresses are cut from messages so
    that errors/ rows are the same on every run."""
    if isinstance(err, BaseException):
        message = exception_message(err)[:2000]
        return (reason.value, type(err).__name__, message)
    return (reason.value, error_class or "ReadError", err)


def record_ref(record: dict[str, Any]) -> tuple[str, int]:
    """Where a record came from: (source shard, row index); the smallest one of a uid is kept."""
    return record["source"], record["source_index"]


def selection(refs: dict[str, Any] | None) -> dict[str, frozenset[int]] | None:
    """``{uid: (source, index)}`` -> ``{source: indices}`` (None: no selection)."""
    if refs is None:
        return None
    by_source: dict[str, set[int]] = {}
    for source, index in refs.values():
        by_source.setdefault(source, set()).add(int(index))
    return {source: frozenset(indices) for source, indices in by_source.items()}


def _wants_range(keep: frozenset[int] | None, lo: int, hi: int) -> bool:
    """Whether rows ``lo .. hi - 1`` of a shard hold one of ``keep`` (None: every row is wanted)."""
    return keep is None or any(lo <= i < hi for i in keep)


class _ReadFn(beam.DoFn):
    """Shared bookkeeping of the readers: uid choice, image-root choice, selection, counters.

    ``index_only``: emit ``(uid, (source, index))`` instead of records, reading no more of
    each shard than the uids need. ``process``'s ``select`` (a ``{uid: ref}`` dict, from a
    side input) keeps only the records at those refs; readers of tables skip the other rows
    before converting them to Python.
    """

    def __init__(self, plan: InputPlan, namespace: str = "capgap", index_only: bool = False):
        self.plan = plan
        self.namespace = namespace
        self.index_only = index_only
        self._select_id: int | None = None
        self._wanted: dict[str, frozenset[int]] | None = None

    def setup(self) -> None:
        self.rows_in = Metrics.counter(self.namespace, "rows_in")
        self.shard_errors = Metrics.counter(self.namespace, "shards_unreadable")

    def process(self, task: Any, select: dict[str, Any] | None = None) -> Iterator[Any]:
        if select is None:
            wanted = None
        else:
            if self._select_id != id(select):
                self._select_id, self._wanted = id(select), selection(select)
            wanted = self._wanted
        for uid, record in self.records(task, wanted):
            if wanted is not None and record["source_index"] not in wanted.get(
                record["source"], ()
            ):
                continue
            self.rows_in.inc()
            yield (uid, record_ref(record)) if self.index_only else (uid, record)

    def records(
        self, task: Any, wanted: dict[str, frozenset[int]] | None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(uid, record) for every row of one task (a shard, or an HF index range); readers
        may leave out rows that ``wanted`` does not name."""
        raise NotImplementedError

    def _root(self, path: str) -> str:
        return self.plan.config.image_root or posixpath.dirname(path) or "."

    def _uid(self, value: Any, source: str, index: int) -> str:
        if value is None or (isinstance(value, str) and not value.strip()):
            return derived_uid(source, index)
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="backslashreplace")
        return str(value)

    def _emit(self, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        record = make_record(**kwargs)
        _make_encodable(record)
        return record["uid"], record

    def _shard_error(self, path: str, reason: Reason, err: BaseException | str, index: int = -1):
        self.shard_errors.inc()
        source = relative_name(path, self.plan.base_dir)
        suffix = "shard" if index < 0 else f"tail@{index}"
        return self._emit(
            uid=f"{source}#{suffix}", source=source, index=index, error=_error(reason, err)
        )


def _image_value(value: Any) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, path, type problem) of one image cell: bytes, a path, or an HF {bytes, path}."""
    if value is None:
        return None, None, None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), None, None
    if isinstance(value, str):
        return None, value, None
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return bytes(data), path if isinstance(path, str) else None, None
        return None, path if isinstance(path, str) else None, None
    return None, None, f"image cell of type {type(value).__name__}"


def _image_type_ok(tp: pa.DataType) -> bool:
    if pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_fixed_size_binary(tp):
        return True
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        return True
    return pa.types.is_struct(tp) and any(tp.field(i).name == "bytes" for i in range(tp.num_fields))


def _caption_type_ok(tp: pa.DataType) -> bool:
    return (
        pa.types.is_string(tp)
        or pa.types.is_large_string(tp)
        or pa.types.is_binary(tp)
        or pa.types.is_large_binary(tp)
        or pa.types.is_null(tp)
    )


class _TableRows:
    """Turns Arrow record batches of one shard into records (shared by Parquet and HF)."""

    def __init__(self, fn: _ReadFn, path: str, source: str, schema: pa.Schema) -> None:
        plan = fn.plan
        self.fn, self.plan, self.path, self.source = fn, plan, path, source
        names = schema.names
        self.problems: list[tuple[Reason, str]] = []
        for role, col, check in (
            ("image", plan.image_column, _image_type_ok),
            ("caption", plan.caption_column, _caption_type_ok),
        ):
            if col is None or col not in names:
                wanted = col or getattr(plan.config, f"{role}_columns")
                self.problems.append((Reason.COLUMN_MISSING, f"no {role} column {wanted}"))
            elif not check(schema.field(col).type):
                self.problems.append(
                    (
                        Reason.COLUMN_TYPE_INVALID,
                        f"{role} column {col!r} has type {schema.field(col).type}",
                    )
                )
        self.uid_col = plan.uid_column if plan.uid_column in names else None
        self.image_root = fn._root(path)

    @property
    def index_columns(self) -> list[str]:
        """The columns an index-only read needs (the uid column, if the shard has one)."""
        return [self.uid_col] if self.uid_col else []

    def rows(
        self,
        batch: pa.RecordBatch | pa.Table,
        start: int,
        wanted: dict[str, frozenset[int]] | None = None,
    ) -> Iterator[tuple[str, dict]]:
        """Records of rows ``start ..`` of the shard; only those ``wanted`` names, if given."""
        plan = self.plan
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        positions = range(start, start + table.num_rows)
        if wanted is not None:
            keep = wanted.get(self.source, frozenset())
            picked = [i for i, index in enumerate(positions) if index in keep]
            if not picked:
                return
            table, positions = table.take(picked), [positions[i] for i in picked]
        n = table.num_rows
        uids = _pylist(table.column(self.uid_col)) if self.uid_col else [None] * n
        if self.fn.index_only:
            for uid, index in zip(uids, positions, strict=True):
                yield self.fn._emit(
                    uid=self.fn._uid(uid, self.source, index), source=self.source, index=index
                )
            return
        columns, cast_problem = self._passthrough(table)
        if self.problems or cast_problem:
            reason, message = self.problems[0] if self.problems else cast_problem
            for uid, index in zip(uids, positions, strict=True):
                yield self.fn._emit(
                    uid=self.fn._uid(uid, self.source, index),
                    source=self.source,
                    index=index,
                    error=(reason.value, "SchemaError", message),
                )
            return
        image_column = table.column(plan.image_column)
        is_text = pa.types.is_string(image_column.type) or pa.types.is_large_string(
            image_column.type
        )
        images = _pylist(image_column, raw=not is_text)
        captions = _pylist(table.column(plan.caption_column), raw=True)
        for i, index in enumerate(positions):
            data, path, problem = _image_value(images[i])
            kwargs: dict[str, Any] = {
                "uid": self.fn._uid(uids[i], self.source, index),
                "source": self.source,
                "index": index,
                "caption": captions[i],
                "columns": {name: col[i] for name, col in columns.items()},
            }
            if problem:
                kwargs["error"] = (Reason.COLUMN_TYPE_INVALID.value, "SchemaError", problem)
            yield self.fn._emit(image=data, image_path=path, image_root=self.image_root, **kwargs)

    def unreadable(
        self, start: int, n: int, err: BaseException, uids: list[Any] | None
    ) -> Iterator[tuple[str, dict]]:
        """Error records for ``n`` rows that exist but cannot be read (``uids``: their uid
        column, when it alone could be read; else the uids are derived)."""
        for i in range(n):
            value = uids[i] if uids is not None else None
            yield self.fn._emit(
                uid=self.fn._uid(value, self.source, start + i),
                source=self.source,
                index=start + i,
                error=_error(Reason.RECORD_UNREADABLE, err),
            )

    def _passthrough(self, table: pa.Table) -> tuple[dict[str, list], tuple[Reason, str] | None]:
        out: dict[str, list] = {}
        for f, src in zip(self.plan.passthrough, self.plan.passthrough_sources, strict=True):
            if src not in table.column_names:
                out[f.name] = [None] * table.num_rows
                continue
            column = table.column(src)
            if column.type != f.type:
                try:
                    column = column.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
                    return {}, (
                        Reason.COLUMN_TYPE_INVALID,
                        f"column {src!r} ({column.type}) does not fit {f.type}: {err}",
                    )
            out[f.name] = _pylist(column)
        return out, None


class ReadParquetFn(_ReadFn):
    """One Parquet shard -> records, row group by row group."""

    def records(self, path: str, wanted=None) -> Iterator[tuple[str, dict]]:
        source = relative_name(path, self.plan.base_dir)
        try:
            fh = FileSystems.open(path, compression_type="uncompressed")
        except (OSError, ValueError) as err:
            yield self._shard_error(path, Reason.SHARD_UNREADABLE, err)
            return
        with fh:
            try:
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
            except (OSError, pa.ArrowException, ValueError, EOFError) as err:
                yield self._shard_error(path, Reason.SHARD_UNREADABLE, err)
                return
            reader = _TableRows(self, path, source, schema)
            columns = reader.index_columns if self.index_only else None
            keep = None if wanted is None else wanted.get(source, frozenset())
            start = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if not _wants_range(keep, start, start + n):
                    start += n
                    continue
                try:
                    table = pf.read_row_group(group, columns=columns)
                except (OSError, pa.ArrowException, ValueError, EOFError) as err:
                    # The group's rows exist but cannot be read: one error row per row, under
                    # its uid when the uid column alone can be read (as an index-only read
                    # of the same shard sees it).
                    yield from reader.unreadable(start, n, err, self._uids(pf, group, reader))
                    start += n
                    continue
                for batch in table.to_batches(max_chunksize=self.plan.config.batch_rows):
                    yield from reader.rows(batch, start, wanted)
                    start += batch.num_rows

    @staticmethod
    def _uids(pf: pq.ParquetFile, group: int, reader: _TableRows) -> list[Any] | None:
        if not reader.uid_col:
            return None
        try:
            return _pylist(pf.read_row_group(group, columns=reader.index_columns).column(0))
        except (OSError, pa.ArrowException, ValueError, EOFError):
            return None


class ReadHfFn(_ReadFn):
    """One index range of a ``datasets.save_to_disk`` folder -> records."""

    def setup(self) -> None:
        super().setup()
        self._ds = None

    def _dataset(self):
        if self._ds is None:
            import datasets

            ds = datasets.load_from_disk(self.plan.pattern)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[self.plan.config.hf_split or ("train" if "train" in ds else next(iter(ds)))]
            self._ds = ds.with_format("arrow")
        return self._ds

    def records(self, task: tuple[int, int], wanted=None) -> Iterator[tuple[str, dict]]:
        start, stop = task
        path = self.plan.pattern
        source = posixpath.basename(path.rstrip("/"))
        if self.plan.config.hf_split:
            source = f"{source}/{self.plan.config.hf_split}"
        try:
            ds = self._dataset()
        except (OSError, ValueError, FileNotFoundError, pa.ArrowException) as err:
            yield self._shard_error(path, Reason.SHARD_UNREADABLE, err, index=start)
            return
        reader = _TableRows(self, path, source, ds.features.arrow_schema)
        keep = None if wanted is None else wanted.get(source, frozenset())
        step = self.plan.config.batch_rows
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            if not _wants_range(keep, lo, hi):
                continue
            try:
                table = ds[lo:hi]  # Arrow, memory-mapped: only converted rows cost
            except (OSError, pa.ArrowException, ValueError) as err:
                yield from reader.unreadable(lo, hi - lo, err, None)
                continue
            yield from reader.rows(table, lo, wanted)


class ReadCsvFn(_ReadFn):
    """One CSV / TSV shard (image path + caption columns) -> records."""

    def records(self, path: str, wanted=None) -> Iterator[tuple[str, dict]]:
        plan = self.plan
        source = relative_name(path, plan.base_dir)
        try:
            fh = FileSystems.open(path)
        except (OSError, ValueError) as err:
            yield self._shard_error(path, Reason.SHARD_UNREADABLE, err)
            return
        with fh:
            reader = csv.reader(text_lines(fh), delimiter=csv_delimiter(path, plan.config))
            try:
                header = next(reader, None)
            except (csv.Error, OSError, EOFError, zlib.error) as err:
                yield self._shard_error(path, Reason.SHARD_UNREADABLE, err)
                return
            if header is None:
                return  # an empty file has no rows
            problem = None
            for role, col in (("image", plan.image_column), ("caption", plan.caption_column)):
                if col is None or col not in header:
                    problem = f"no {role} column {col or getattr(plan.config, f'{role}_columns')}"
            position = {name: i for i, name in reversed(list(enumerate(header)))}
            index = 0
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:  # one bad line; the reader resumes at the next
                    yield self._emit(
                        uid=derived_uid(source, index),
                        source=source,
                        index=index,
                        error=_error(Reason.RECORD_MALFORMED, err),
                    )
                    index += 1
                    continue
                except (OSError, EOFError, zlib.error) as err:
                    yield self._shard_error(path, Reason.SHARD_TRUNCATED, err, index=index)
                    return
                if not row:
                    continue  # blank line
                yield self._row(path, source, index, header, position, row, problem)
                index += 1

    def _row(self, path, source, index, header, position, row, problem):
        plan = self.plan

        def cell(name: str | None) -> str | None:
            if name is None or name not in position or position[name] >= len(row):
                return None
            return row[position[name]]

        uid = self._uid(cell(plan.uid_column), source, index)
        error = None
        if problem:
            error = (Reason.COLUMN_MISSING.value, "SchemaError", problem)
        elif len(row) != len(header):
            error = (
                Reason.RECORD_MALFORMED.value,
                "CsvError",
                f"line has {len(row)} fields, header has {len(header)}",
            )
        columns = {
            f.name: cell(src)
            for f, src in zip(plan.passthrough, plan.passthrough_sources, strict=True)
        }
        image_path = cell(plan.image_column)
        return self._emit(
            uid=uid,
            source=source,
            index=index,
            image_path=image_path if image_path else None,
            caption=cell(plan.caption_column),
            columns=columns,
            image_root=self._root(path),
            error=error,
        )


def _unread_tail(tar: tarfile.TarFile) -> str | None:
    """What follows the point where tarfile stopped, if it is not end-of-archive padding."""
    try:
        while True:
            chunk = tar.fileobj.read(1 << 16)
            if not chunk:
                return None
            if chunk.strip(b"\0"):
                return "non-zero data follows it"
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        return f"reading on failed: {type(err).__name__}"


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower() if dot else ""


class ReadTarFn(_ReadFn):
    """One WebDataset / img2dataset tar shard (key.jpg + key.txt + key.json) -> records."""

    def records(self, path: str, wanted=None) -> Iterator[tuple[str, dict]]:
        source = relative_name(path, self.plan.base_dir)
        try:
            fh = FileSystems.open(path, compression_type="uncompressed")
        except (OSError, ValueError) as err:
            yield self._shard_error(path, Reason.SHARD_UNREADABLE, err)
            return
        with fh:
            try:
                tar = tarfile.open(fileobj=fh, mode="r|*")  # noqa: SIM115 (closed with fh)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                yield self._shard_error(path, Reason.SHARD_UNREADABLE, err)
                return
            key, parts, problems, index = None, {}, [], 0
            members = iter(tar)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    # tarfile ends a stream quietly at a member header with a bad checksum;
                    # anything but zero padding after that point is unread data.
                    unread = _unread_tail(tar)
                    if unread:
                        if key is not None:
                            yield self._sample(path, source, index, key, parts, problems)
                            index += 1
                        message = f"tar stream ends at an invalid member header; {unread}"
                        yield self._shard_error(path, Reason.SHARD_TRUNCATED, message, index)
                        return
                    break
                except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                    if key is not None:
                        problems.append(_error(Reason.RECORD_UNREADABLE, err))
                        yield self._sample(path, source, index, key, parts, problems)
                        index += 1
                    yield self._shard_error(path, Reason.SHARD_TRUNCATED, err, index=index)
                    return
                if not member.isfile():
                    continue
                member_key, ext = _split_member(member.name)
                if member_key != key:
                    if key is not None:
                        yield self._sample(path, source, index, key, parts, problems)
                        index += 1
                    key, parts, problems = member_key, {}, []
                try:
                    handle = tar.extractfile(member)
                    parts[ext] = handle.read() if handle is not None else b""
                except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                    problems.append(_error(Reason.RECORD_UNREADABLE, err))
                    yield self._sample(path, source, index, key, parts, problems)
                    index += 1
                    yield self._shard_error(path, Reason.SHARD_TRUNCATED, err, index=index)
                    return
            if key is not None:
                yield self._sample(path, source, index, key, parts, problems)

    def _sample(self, path, source, index, key, parts, problems):
        cfg = self.plan.config
        meta_raw = parts.get("json")
        meta, meta_text, error = None, None, problems[0] if problems else None
        if meta_raw is not None:
            try:
                meta_text = meta_raw.decode("utf-8")
                meta = json.loads(meta_text)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                error = error or _error(Reason.METADATA_INVALID, err)
                meta_text = None
        meta = meta if isinstance(meta, dict) else {}
        uid_value = next((meta[c] for c in cfg.uid_columns if meta.get(c) not in (None, "")), None)
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if "txt" in parts:
            caption: Any = parts["txt"]
        else:
            caption = next((meta[c] for c in cfg.caption_columns if c in meta), None)
        return self._emit(
            uid=self._uid(uid_value, source, index) if uid_value is not None else key,
            source=source,
            index=index,
            image=image,
            caption=caption,
            columns={"meta_json": meta_text},
            image_root=self._root(path),
            error=error,
        )


class ReadRecords(beam.PTransform):
    """The input described by an :class:`InputPlan` -> ``(uid, record)`` pairs.

    ``namespace`` is the counters' (``rows_in``, ``shards_unreadable``): ``capgap curate``
    reads its input three times (index, bank, main pass) and counts only the main pass
    under ``capgap``. ``index_only``: ``(uid, (source, index))`` pairs instead, from as
    little of each shard as the uids need (Parquet: the uid column). ``select``: a
    singleton PCollection of ``{uid: (source, index)}``; only the records at those refs
    are read (tables skip the other rows before converting them).
    """

    def __init__(
        self,
        plan: InputPlan,
        namespace: str = "capgap",
        *,
        index_only: bool = False,
        select: beam.PCollection | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.namespace = namespace
        self.index_only = index_only
        self.select = select

    def expand(self, pbegin):
        plan = self.plan
        if plan.format == "hf":
            step = plan.config.hf_rows_per_task
            tasks = [(lo, min(lo + step, plan.hf_rows)) for lo in range(0, plan.hf_rows, step)]
            fn: _ReadFn = ReadHfFn(plan, self.namespace, self.index_only)
        else:
            tasks = [path for path, _, _ in plan.files]
            reader = {"parquet": ReadParquetFn, "csv": ReadCsvFn, "webdataset": ReadTarFn}
            fn = reader[plan.format](plan, self.namespace, self.index_only)
        side = {} if self.select is None else {"select": beam.pvalue.AsSingleton(self.select)}
        return (
            pbegin
            | "Shards" >> beam.Create(tasks)
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShards" >> beam.ParDo(fn, **side)
        )
