"""Readers for ``capgap curate``: Parquet, WebDataset tar, HF ``datasets`` on disk, CSV/TSV.

:func:`discover` (driver side, :mod:`.discover`) matches the input and builds an
:class:`InputPlan`: the shards, the image / caption / uid columns and the passthrough
schema. :class:`ReadRecords` (:mod:`.read`) fans the plan's shards (or HF index ranges)
out to one reader DoFn per format (:mod:`.parquet`, :mod:`.hf`, :mod:`.csv`,
:mod:`.webdataset`, all built on :mod:`.base`), which turn each row into a
``(uid, record)`` pair; the record is a plain dict (:func:`make_record`, :mod:`.record`):
the uid, the source shard and row index, the image as bytes or as a path, the raw
caption and the row's other columns, typed by the passthrough schema. Readers never
crash on bad input: an unreadable shard, a corrupt tar member, a missing column or a
column of the wrong type becomes a record that carries an ``error`` (a reason code from
:mod:`capgap.transforms.reasons`), which decoding routes to ``errors/``.

Two lighter modes serve ``capgap curate``'s side passes (``transforms/bank.py``):
``index_only`` emits lists of ``(uid, (source, index))`` (a block of rows an element) from
as little of each shard as the uids need (Parquet: the uid column alone), and ``select``
reads only the records at given refs (Parquet and HF skip the other rows before converting
them to Python). Both see the same
uid for every record as a full read, bad rows included.

Paths are anything Beam's ``FileSystems`` understands (local, ``gs://``, ...), with
globs, brace alternatives / ranges and folders (side files skipped; an img2dataset
webdataset folder's metadata Parquets give its failed rows: :mod:`.discover`). The uid is
taken from the first present column of ``read.uid_columns`` (``uid``, ``key``, ...), else
derived from the shard's path relative to the input pattern's folder plus the row index
(``web-00000-of-00004.parquet#17``); a real uid equal to a derived one wins in
:mod:`capgap.transforms.dedup` (the derived one gets ``#derived`` appended).

    plan = discover(ReadConfig(), "data/synth/web/*.parquet")
    records = pipeline | ReadRecords(plan)
"""

from capgap.transforms.readers.discover import InputPlan, ReadConfig, discover
from capgap.transforms.readers.read import ReadRecords
from capgap.transforms.readers.record import make_record, record_ref

__all__ = ["InputPlan", "ReadConfig", "ReadRecords", "discover", "make_record", "record_ref"]
