"""HF ``datasets`` reader: one index range of a ``save_to_disk`` folder -> records.

The dataset is memory-mapped Arrow; only the batches that hold wanted rows are converted.
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
