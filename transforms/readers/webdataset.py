"""WebDataset reader: one tar shard (``key.jpg`` + ``key.txt`` + ``key.json``) -> records.

Members are grouped by key (img2dataset layout); the caption is the ``.txt`` member, else
a caption field of the ``.json`` one, which is passed through as ``meta_json``. A
truncated or corrupt tar ends the shard with one error record. A sample with two image
members (``a.jpg`` and ``a.png``) or one member twice is ``record_malformed``: which
image the caption belongs to is unknown.

img2dataset (webdataset output mode) writes only downloaded samples into the tar; its
``00000.parquet`` next to ``00000.tar`` lists every URL of the shard with ``status`` and
``error_message``. The rows of that metadata file whose status is not ``success`` are read
after the tar, as ``source_failed`` error records (source: the metadata file, index: its
row), so every URL given to img2dataset ends in exactly one output.
"""

from __future__ import annotations

import json
import math
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capgap.transforms.readers.base import _ReadFn
from capgap.transforms.readers.discover import relative_name
from capgap.transforms.readers.record import _error
from capgap.transforms.readers.table import _pylist, source_failed
from capgap.transforms.reasons import Reason

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


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
        fh, unreadable = self._open(path, "uncompressed")
        if unreadable is not None:
            yield unreadable
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
                if ext in parts:
                    problems.append(
                        _error(Reason.RECORD_MALFORMED, f"member {member.name!r} appears twice")
                    )
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
        metadata = self.plan.sidecar(path)
        if metadata is not None:
            yield from self._failed_rows(metadata)

    def _failed_rows(self, path: str) -> Iterator[tuple[str, dict]]:
        """img2dataset's failed rows, from the tar's metadata Parquet (not in the tar)."""
        cfg = self.plan.config
        source = relative_name(path, self.plan.base_dir)
        fh, unreadable = self._open(path, "uncompressed")
        if unreadable is not None:
            yield unreadable
            return
        with fh:
            try:
                table = pq.read_table(fh, page_checksum_verification=True)
            except (OSError, pa.ArrowException, ValueError, EOFError) as err:
                yield self._shard_error(path, Reason.SHARD_UNREADABLE, err)
                return
        names = table.column_names
        if cfg.status_column not in names:
            return
        status = _pylist(table.column(cfg.status_column))
        message_col = cfg.status_message_column
        messages = (
            _pylist(table.column(message_col)) if message_col in names else [None] * len(status)
        )
        uid_col = next((c for c in cfg.uid_columns if c in names), None)
        caption_col = next((c for c in cfg.caption_columns if c in names), None)
        for index, (state, message) in enumerate(zip(status, messages, strict=True)):
            error = source_failed(state, message, cfg.status_ok)
            if error is None:
                continue
            row = {name: _jsonable(table.column(name)[index].as_py()) for name in names}
            yield self._emit(
                uid=self._uid(row.get(uid_col) if uid_col else None, source, index),
                source=source,
                index=index,
                caption=row.get(caption_col) if caption_col else None,
                columns={"meta_json": json.dumps(row, ensure_ascii=False)},
                image_root=self._root(path),
                error=error,
            )

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
        images = [e for e in IMAGE_EXTENSIONS if e in parts]
        image = parts[images[0]] if images else None
        if len(images) > 1:
            members = ", ".join(f"{key}.{e}" for e in images)
            error = error or _error(
                Reason.RECORD_MALFORMED, f"two image members for one key: {members}"
            )
        if error is None and cfg.status_column in meta and cfg.status_message_column in meta:
            status, message = meta[cfg.status_column], meta[cfg.status_message_column]
            error = source_failed(status, message, cfg.status_ok)
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


def _jsonable(value: Any) -> Any:
    """A metadata cell as JSON can hold it (bytes as text, NaN as null)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict | list | str | int | float | bool) or value is None:
        return value
    return str(value)
