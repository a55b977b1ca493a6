"""CSV / TSV reader: one shard (image path + caption columns) -> records.

Every cell is text; a malformed line becomes an error record and reading resumes at the
next line. ``.gz`` shards are decompressed by Beam's ``FileSystems``.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Iterator

from capgap.transforms.readers.base import _ReadFn
from capgap.transforms.readers.discover import csv_delimiter, relative_name, text_lines
from capgap.transforms.readers.record import _error, derived_uid
from capgap.transforms.reasons import Reason


class ReadCsvFn(_ReadFn):
    """One CSV / TSV shard (image path + caption columns) -> records."""

    def records(self, path: str, wanted=None) -> Iterator[tuple[str, dict]]:
        plan = self.plan
        source = relative_name(path, plan.base_dir)
        fh, unreadable = self._open(path, None)
        if unreadable is not None:
            yield unreadable
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
