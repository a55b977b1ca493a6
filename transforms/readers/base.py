"""``_ReadFn``: the base DoFn of the readers (uid choice, image root, selection, counters).

A reader subclasses it and implements ``records(task, wanted)`` for one task (a shard,
or an HF index range); ``process`` applies the selection and counts ``rows_in``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from capgap.transforms.readers.discover import InputPlan, relative_name
from capgap.transforms.readers.record import (
    _error,
    _make_encodable,
    derived_uid,
    make_record,
    record_ref,
    selection,
    shard_error_uid,
)
from capgap.transforms.reasons import Reason

_COUNT_EVERY = 1024
#: (uid, ref) pairs per element of an index-only read: one Beam element a block, not a row.
_INDEX_BLOCK = 4096


class _ReadFn(beam.DoFn):
    """Shared bookkeeping of the readers: uid choice, image-root choice, selection, counters.

    ``index_only``: emit blocks (lists) of up to :data:`_INDEX_BLOCK` ``(uid, (source,
    index))`` pairs instead of records, reading no more of each shard than the uids need.
    ``process``'s ``select`` (a ``{uid: ref}`` dict, from a side input) keeps only the
    records at those refs; readers of tables skip the other rows before converting them to
    Python.
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
        counted = 0  # rows_in is bumped every _COUNT_EVERY rows: one inc() a row costs ~1 us
        block: list[tuple[str, tuple[str, int]]] = []
        try:
            for uid, record in self.records(task, wanted):
                if wanted is not None and record["source_index"] not in wanted.get(
                    record["source"], ()
                ):
                    continue
                counted += 1
                if counted == _COUNT_EVERY:
                    self.rows_in.inc(counted)
                    counted = 0
                if not self.index_only:
                    yield uid, record
                    continue
                block.append((uid, record_ref(record)))
                if len(block) == _INDEX_BLOCK:
                    yield block
                    block = []
            if block:
                yield block
        finally:
            if counted:
                self.rows_in.inc(counted)

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

    def _emit(self, encodable: bool = False, **kwargs: Any) -> tuple[str, dict[str, Any]]:
        """``(uid, record)`` of :func:`make_record` ``(**kwargs)``; ``encodable``: the caller
        knows every text in it is valid UTF-8 (Arrow's strings, a UTF-8 source name), so
        :func:`_make_encodable` has nothing to do."""
        record = make_record(**kwargs)
        if not encodable:
            _make_encodable(record)
        return record["uid"], record

    def _open(self, path: str, compression: str | None) -> tuple[Any, Any]:
        """(file handle, None), or (None, the shard's ``shard_unreadable`` record) when it
        cannot be opened. ``compression``: Beam's ``compression_type`` (None: by suffix)."""
        kwargs = {} if compression is None else {"compression_type": compression}
        try:
            return FileSystems.open(path, **kwargs), None
        except (OSError, ValueError) as err:
            return None, self._shard_error(path, Reason.SHARD_UNREADABLE, err)

    def _shard_error(self, path: str, reason: Reason, err: BaseException | str, index: int = -1):
        self.shard_errors.inc()
        source = relative_name(path, self.plan.base_dir)
        return self._emit(
            uid=shard_error_uid(source, index),
            source=source,
            index=index,
            error=_error(reason, err),
        )
