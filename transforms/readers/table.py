"""Arrow tables -> records: the row conversion shared by the Parquet and HF readers.

:class:`_TableRows` checks the image / caption column types of one shard once, then
turns its batches into records (or error records, one per row, when a column is missing
or of the wrong type).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from capgap.transforms.readers.base import _ReadFn
from capgap.transforms.readers.record import _error, _is_utf8
from capgap.transforms.reasons import Reason


def _pylist(column: pa.ChunkedArray | pa.Array, raw: bool = False) -> list:
    """``to_pylist``, surviving invalid UTF-8 in string columns (as bytes when ``raw``,
    else backslash-escaped text)."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)  # pandas' categorical columns
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = column.cast(pa.large_binary()).to_pylist()
        if raw:
            return values
        return [None if v is None else v.decode("utf-8", "backslashreplace") for v in values]


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


def source_failed(status: Any, message: Any, ok: list[str]) -> tuple[str, str, str] | None:
    """The ``source_failed`` error of a row whose status is set and not one of ``ok``."""
    if status is None or str(status) in ok:
        return None
    text = f"{status}: {message}" if message not in (None, "") else str(status)
    return (Reason.SOURCE_FAILED.value, "SourceFailed", text[:2000])


def _values(tp: pa.DataType) -> pa.DataType:
    """The value type of a dictionary-encoded column (pandas' categoricals), else ``tp``."""
    return tp.value_type if pa.types.is_dictionary(tp) else tp


def _image_type_ok(tp: pa.DataType) -> bool:
    tp = _values(tp)
    if pa.types.is_binary(tp) or pa.types.is_large_binary(tp) or pa.types.is_fixed_size_binary(tp):
        return True
    if pa.types.is_string(tp) or pa.types.is_large_string(tp):
        return True
    return pa.types.is_struct(tp) and any(tp.field(i).name == "bytes" for i in range(tp.num_fields))


def _caption_type_ok(tp: pa.DataType) -> bool:
    tp = _values(tp)
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
        # Arrow's strings are valid UTF-8 (``_pylist`` escapes what is not), so a record needs
        # ``_make_encodable`` only for text from the shard's name (its source, derived uids).
        self.encodable = _is_utf8(source)
        self.image_root = fn._root(path)
        cfg = plan.config
        self.status_cols = None
        if cfg.status_column in names and cfg.status_message_column in names:
            self.status_cols = (cfg.status_column, cfg.status_message_column)

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
                    self.encodable,
                    uid=self.fn._uid(uid, self.source, index),
                    source=self.source,
                    index=index,
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
        failed = self._failed(table)
        for i, index in enumerate(positions):
            data, path, problem = _image_value(images[i])
            kwargs: dict[str, Any] = {
                "uid": self.fn._uid(uids[i], self.source, index),
                "source": self.source,
                "index": index,
                "caption": captions[i],
                "columns": {name: col[i] for name, col in columns.items()},
            }
            if failed[i] is not None:
                kwargs["error"] = failed[i]
            elif problem:
                kwargs["error"] = (Reason.COLUMN_TYPE_INVALID.value, "SchemaError", problem)
            yield self.fn._emit(
                self.encodable, image=data, image_path=path, image_root=self.image_root, **kwargs
            )

    def _failed(self, table: pa.Table) -> list[tuple[str, str, str] | None]:
        """Per row: the ``source_failed`` error of a row the input's tool marked failed
        (img2dataset's ``status`` / ``error_message``), else None."""
        if self.status_cols is None:
            return [None] * table.num_rows
        status_col, message_col = self.status_cols
        return [
            source_failed(status, message, self.plan.config.status_ok)
            for status, message in zip(
                _pylist(table.column(status_col)), _pylist(table.column(message_col)), strict=True
            )
        ]

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
