"""Parquet reader: one shard -> records, row group by row group.

Index-only reads fetch the uid column alone; selective reads skip row groups that hold
no wanted row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capgap.transforms.readers.base import _ReadFn
from capgap.transforms.readers.discover import relative_name
from capgap.transforms.readers.record import _wants_range
from capgap.transforms.readers.table import _pylist, _TableRows
from capgap.transforms.reasons import Reason


class ReadParquetFn(_ReadFn):
    """One Parquet shard -> records, row group by row group."""

    def records(self, path: str, wanted=None) -> Iterator[tuple[str, dict]]:
        source = relative_name(path, self.plan.base_dir)
        fh, unreadable = self._open(path, "uncompressed")
        if unreadable is not None:
            yield unreadable
            return
        with fh:
            try:
                # Pages written with CRCs (write_page_checksum) are checked: a flipped
                # byte is a record_unreadable row group, not silently wrong data.
                pf = pq.ParquetFile(fh, page_checksum_verification=True)
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
