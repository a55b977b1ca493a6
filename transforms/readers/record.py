"""The raw input record every reader emits, and the helpers around it.

A record is a plain dict (:func:`make_record`); :func:`record_ref` names where it came
from, :func:`selection` turns ``{uid: ref}`` into the rows a selective read keeps.

    record = make_record(uid="a#0", source="a.parquet", index=0, caption="a dog")
"""

from __future__ import annotations

from typing import Any

from capgap.transforms.reasons import Reason, exception_message


def derived_uid(source: str, index: int) -> str:
    """The uid of a row that has none: ``<shard>#<row>``."""
    return f"{source}#{index}"


def shard_error_uid(source: str, index: int) -> str:
    """The uid of a shard's error row: ``<shard>#shard`` (whole shard), ``<shard>#tail@N``."""
    return f"{source}#shard" if index < 0 else f"{source}#tail@{index}"


def is_derived(uid: str, ref: tuple[str, int]) -> bool:
    """Whether ``uid`` is the one capgap derives for the row at ``ref`` (its own position).

    Derived uids are unique by construction (one per ref); a real uid can still equal one,
    and then the real one wins (:mod:`capgap.transforms.dedup`). A real uid that names its
    own row's position is treated as derived: it cannot collide with itself.
    """
    source, index = ref
    return uid == derived_uid(source, index) or uid == shard_error_uid(source, index)


def renamed_derived(uid: str) -> str:
    """What a derived uid becomes when a real uid of the input equals it."""
    return f"{uid}#derived"


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
