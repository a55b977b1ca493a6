"""``ReadRecords``: the PTransform that reads an :class:`InputPlan` with its format's reader.

Each shard (or HF index range of one split) is one task; tasks are reshuffled across workers.

    records = pipeline | ReadRecords(discover(ReadConfig(), "shards/*.tar"))
"""

from __future__ import annotations

import apache_beam as beam

from capgap.transforms.readers.base import _ReadFn
from capgap.transforms.readers.csv import ReadCsvFn
from capgap.transforms.readers.discover import InputPlan
from capgap.transforms.readers.hf import ReadHfFn
from capgap.transforms.readers.parquet import ReadParquetFn
from capgap.transforms.readers.webdataset import ReadTarFn


class ReadRecords(beam.PTransform):
    """The input described by an :class:`InputPlan` -> ``(uid, record)`` pairs.

    ``namespace`` is the counters' (``rows_in``, ``shards_unreadable``): ``capgap curate``
    reads its input three times (index, bank, main pass) and counts only the main pass
    under ``capgap``. ``index_only``: lists of ``(uid, (source, index))`` pairs instead (up
    to 4,096 rows an element: the index pass's per-row cost is a list append, not a Beam
    element), from as little of each shard as the uids need (Parquet: the uid column). ``select``: a
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
            tasks = [
                (split, lo, min(lo + step, rows))
                for split, rows in plan.hf_splits
                for lo in range(0, rows, step)
            ]
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
