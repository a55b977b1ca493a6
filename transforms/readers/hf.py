"""HF ``datasets`` reader: one index range of one split of a ``save_to_disk`` folder -> records.

Each split of a DatasetDict is its own ``source`` (``folder/split``). The dataset is
memory-mapped Arrow; only the batches that hold wanted rows are converted.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pyarrow as pa

from capgap.transforms.readers.base import _ReadFn
from capgap.transforms.readers.record import _wants_range
from capgap.transforms.readers.table import _TableRows
from capgap.transforms.reasons import Reason


class ReadHfFn(_ReadFn):
    """One index range ``(split, start, stop)`` of a ``datasets.save_to_disk`` folder ->
    records (split ``""``: a folder holding one Dataset)."""

    def setup(self) -> None:
        super().setup()
        self._ds = None

    def _dataset(self, split: str):
        if self._ds is None:
            import datasets

            self._ds = datasets.load_from_disk(self.plan.pattern)
        ds = self._ds[split] if split else self._ds
        return ds.with_format("arrow")

    def records(self, task: tuple[str, int, int], wanted=None) -> Iterator[tuple[str, dict]]:
        split, start, stop = task
        path = posixpath.join(self.plan.pattern, split) if split else self.plan.pattern
        source = self.plan.hf_source(split)
        try:
            ds = self._dataset(split)
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
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
