"""Duplicate uids: the first record of each uid (smallest source, row index) goes on.

:class:`FirstRefs` counts each uid's records and finds its first ref from blocks of
``(uid, ref)`` pairs (in ``capgap curate`` those come from the index pass, a uid-only read of
the input: :mod:`capgap.transforms.bank`); :class:`DropDuplicateUids` sends every later
record of a uid to ``errors/`` as ``duplicate_uid``, naming where the kept one was.

A derived uid (``<shard>#N``, for a row without one: :func:`~capgap.transforms.readers.
record.derived_uid`) is unique by construction but can equal a real uid of the input.
Then the real one wins: it is the first ref of the uid whatever the order, and the
derived record goes on as ``<shard>#N#derived`` instead of becoming a duplicate.

    first_refs = refs | FirstRefs()   # refs: ReadRecords(plan, index_only=True), blocks
    unique = records | DropDuplicateUids(first_refs)   # unique.ok, unique[ERRORS]
    decoded = records | DedupDecode(first_refs, DecodeConfig(), CaptionConfig())  # one step
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from capgap.transforms.captions import CaptionConfig
from capgap.transforms.decode import DecodeConfig, DecodeFn
from capgap.transforms.readers import record_ref
from capgap.transforms.readers.record import is_derived, renamed_derived
from capgap.transforms.reasons import Reason, Stage, error_row
from capgap.transforms.schema import ERRORS

#: Buckets of :class:`FirstRefs` at least; see :func:`index_buckets`.
MIN_BUCKETS = 64
#: (uid, ref) pairs a :class:`_BucketRefsFn` holds before it sends its lists on.
_MAX_HELD = 1 << 16


def index_buckets(files: int, total_bytes: int) -> int:
    """How many buckets :class:`FirstRefs` spreads the uids of an input over: at least
    :data:`MIN_BUCKETS`, one per input file, and one per GiB of input, so that a bucket (held
    in one worker's memory while it is counted) holds the uids of about one shard or one
    GiB of input, whichever is less."""
    return max(MIN_BUCKETS, files, -(-total_bytes // (1 << 30)))


def _bucket(uid: str, buckets: int) -> int:
    """A uid's bucket: the same in every process (unlike ``hash``)."""
    return zlib.crc32(uid.encode("utf-8", "backslashreplace")) % buckets


class _BucketRefsFn(beam.DoFn):
    """Blocks of (uid, ref) pairs -> (bucket, [(uid, (derived?, ref)), ...]) lists, one per
    bucket per bundle (or per :data:`_MAX_HELD` pairs), so that the shuffle moves lists."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets

    def start_bundle(self) -> None:
        self._lists: dict[int, list] = {}
        self._held = 0

    def process(self, block) -> Iterator[tuple[int, list]]:
        lists, buckets = self._lists, self.buckets
        for uid, ref in block:
            ref = tuple(ref)
            lists.setdefault(_bucket(uid, buckets), []).append((uid, (is_derived(uid, ref), ref)))
        self._held += len(block)
        if self._held >= _MAX_HELD:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        for kv in self._flush():
            yield GlobalWindows.windowed_value_at_end_of_window(kv)

    def _flush(self) -> list[tuple[int, list]]:
        out = list(self._lists.items())
        self._lists, self._held = {}, 0
        return out


def _first_refs(bucket_lists) -> list[tuple[str, tuple[int, tuple]]]:
    """One bucket's lists -> a block of (uid, (count, smallest ref)), one per uid: a record
    with a real uid before one whose uid is derived, then the smallest (source, index);
    order-independent."""
    _, lists = bucket_lists
    seen: dict[str, list] = {}
    for entries in lists:
        for uid, flagged_ref in entries:
            known = seen.get(uid)
            if known is None:
                seen[uid] = [1, flagged_ref]
            else:
                known[0] += 1
                if flagged_ref < known[1]:
                    known[1] = flagged_ref
    return [(uid, (count, flagged_ref[1])) for uid, (count, flagged_ref) in seen.items()]


def check_duplicate(
    element: tuple[str, dict[str, Any]], duplicates: dict[str, tuple]
) -> tuple[tuple[str, dict[str, Any]] | None, dict[str, Any] | None]:
    """(element to go on, None), or (None, its ``duplicate_uid`` errors/ row) when it is a
    later record of a uid; ``duplicates``: {uid: first ref} of the uids seen more than once.
    A derived uid equal to a real one goes on renamed."""
    uid, record = element
    keep = duplicates.get(uid)
    if keep is None:
        return element, None
    ref = record_ref(record)
    if keep == tuple(ref):
        return element, None
    if is_derived(uid, ref):  # a real uid of the input equals this derived one
        uid = renamed_derived(uid)
        return (uid, {**record, "uid": uid}), None
    message = f"uid {uid!r} first seen at {keep[0]}#{keep[1]}"
    return None, error_row(record, Stage.DEDUP, Reason.DUPLICATE_UID, "DuplicateUid", message)


class _DropDuplicatesFn(beam.DoFn):
    def process(self, element, duplicates):
        kept, error = check_duplicate(element, duplicates)
        if error is not None:
            yield beam.pvalue.TaggedOutput(ERRORS, error)
        else:
            yield kept


class _DedupDecodeFn(DecodeFn):
    """:class:`_DropDuplicatesFn` then :class:`~capgap.transforms.decode.DecodeFn` in one
    step: a record crosses one Beam element boundary for both."""

    def process(self, element, duplicates):
        kept, error = check_duplicate(element, duplicates)
        if error is not None:
            yield beam.pvalue.TaggedOutput(ERRORS, error)
            return
        yield from super().process(kept)


def _repeated(block: list[tuple[str, tuple[int, tuple]]]) -> list[tuple[str, tuple]]:
    return [(uid, ref) for uid, (count, ref) in block if count > 1]


def repeated_uids(first_refs):
    """:class:`FirstRefs` -> (uid, first ref) of the uids with more than one record."""
    return first_refs | "OnlyRepeated" >> beam.FlatMap(_repeated)


class FirstRefs(beam.PTransform):
    """Blocks (lists) of (uid, ref) pairs (``ReadRecords(index_only=True)``) -> blocks of
    (uid, (number of records, smallest ref)), every uid in one of them.

    The pairs are gathered into lists per bucket of uids (:func:`index_buckets`; ``buckets``
    of them) where they are read, and each bucket is counted in one place and comes out as
    one block: a row costs a list append rather than a keyed combine of its own through the
    shuffle, or a Beam element of its own before or after it.
    """

    def __init__(self, buckets: int = MIN_BUCKETS) -> None:
        super().__init__()
        if buckets < 1:
            raise ValueError("FirstRefs needs at least one bucket")
        self.buckets = buckets

    def expand(self, refs):
        return (
            refs
            | "Bucket" >> beam.ParDo(_BucketRefsFn(self.buckets))
            | "ByBucket" >> beam.GroupByKey()
            | "FirstRef" >> beam.Map(_first_refs)
        )


class DropDuplicateUids(beam.PTransform):
    """Keep the first record of each uid (smallest source, row index); the rest -> errors.

    ``first_refs``: the :class:`FirstRefs` of the same records, computed elsewhere (``capgap
    curate`` takes them from a separate read of the input, so that the records themselves
    flow on without waiting for the whole input to be indexed). Without it they are computed
    from ``records``, which then wait, materialised, until every uid is counted.
    """

    def __init__(self, first_refs=None) -> None:
        super().__init__()
        self.first_refs = first_refs

    def expand(self, records):
        first_refs = self.first_refs
        if first_refs is None:
            refs = records | "Refs" >> beam.Map(lambda kv: [(kv[0], record_ref(kv[1]))])
            first_refs = refs | "Index" >> FirstRefs()
        duplicates = repeated_uids(first_refs)
        return records | "DropDuplicates" >> beam.ParDo(
            _DropDuplicatesFn(), duplicates=beam.pvalue.AsDict(duplicates)
        ).with_outputs(ERRORS, main="ok")


class DedupDecode(beam.PTransform):
    """:class:`DropDuplicateUids` and :class:`~capgap.transforms.decode.DecodeRecords` as one
    step: (uid, record) -> tagged ``ok`` (uid, pair) and ``errors`` rows (duplicates, read
    and decode failures). ``first_refs``: :class:`FirstRefs` of the same records."""

    def __init__(self, first_refs, decode: DecodeConfig, caption: CaptionConfig) -> None:
        super().__init__()
        self.first_refs, self.decode, self.caption = first_refs, decode, caption

    def expand(self, records):
        duplicates = repeated_uids(self.first_refs)
        return records | "DedupDecode" >> beam.ParDo(
            _DedupDecodeFn(self.decode, self.caption), duplicates=beam.pvalue.AsDict(duplicates)
        ).with_outputs(ERRORS, main="ok")
