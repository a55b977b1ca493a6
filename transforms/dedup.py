"""Duplicate uids: the first record of each uid (smallest source, row index) goes on.

:class:`FirstRefs` counts each uid's records and finds its first ref from ``(uid, ref)``
pairs (in ``capgap curate`` those come from the index pass, a uid-only read of the input:
:mod:`capgap.transforms.bank`); :class:`DropDuplicateUids` sends every later record of a
uid to ``errors/`` as ``duplicate_uid``, naming where the kept one was.

A derived uid (``<shard>#N``, for a row without one: :func:`~capgap.transforms.readers.
record.derived_uid`) is unique by construction but can equal a real uid of the input.
Then the real one wins: it is the first ref of the uid whatever the order, and the
derived record goes on as ``<shard>#N#derived`` instead of becoming a duplicate.

    first_refs = refs | FirstRefs()
    unique = records | DropDuplicateUids(first_refs)   # unique.ok, unique[ERRORS]
"""

from __future__ import annotations

import apache_beam as beam

from capgap.transforms.readers import record_ref
from capgap.transforms.readers.record import is_derived, renamed_derived
from capgap.transforms.reasons import Reason, Stage, error_row
from capgap.transforms.schema import ERRORS


class _FirstRef(beam.CombineFn):
    """(count, smallest (source, index)) of one uid's records, a record with a real uid
    before one whose uid is derived; order-independent. Inputs: (derived?, ref)."""

    def create_accumulator(self):
        return 0, None

    def add_input(self, acc, flagged_ref):
        count, best = acc
        return count + 1, flagged_ref if best is None or flagged_ref < best else best

    def merge_accumulators(self, accs):
        count, best = 0, None
        for c, flagged_ref in accs:
            count += c
            if flagged_ref is not None and (best is None or flagged_ref < best):
                best = flagged_ref
        return count, best

    def extract_output(self, acc):
        count, best = acc
        return count, None if best is None else tuple(best[1])


class _DropDuplicatesFn(beam.DoFn):
    def process(self, element, duplicates):
        uid, record = element
        keep = duplicates.get(uid)
        ref = record_ref(record)
        if keep is not None and keep != tuple(ref):
            if is_derived(uid, ref):  # a real uid of the input equals this derived one
                uid = renamed_derived(uid)
                yield uid, {**record, "uid": uid}
                return
            yield beam.pvalue.TaggedOutput(
                ERRORS,
                error_row(
                    record,
                    Stage.DEDUP,
                    Reason.DUPLICATE_UID,
                    "DuplicateUid",
                    f"uid {uid!r} first seen at {keep[0]}#{keep[1]}",
                ),
            )
            return
        yield element


class FirstRefs(beam.PTransform):
    """(uid, ref) pairs (``ReadRecords(index_only=True)``) -> (uid, (number of records,
    smallest ref)) for every uid."""

    def expand(self, refs):
        return (
            refs
            | "FlagDerived"
            >> beam.Map(lambda kv: (kv[0], (is_derived(kv[0], kv[1]), tuple(kv[1]))))
            | "FirstRef" >> beam.CombinePerKey(_FirstRef())
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
            refs = records | "Refs" >> beam.Map(lambda kv: (kv[0], record_ref(kv[1])))
            first_refs = refs | "Index" >> FirstRefs()
        duplicates = (
            first_refs
            | "OnlyRepeated" >> beam.Filter(lambda kv: kv[1][0] > 1)
            | "KeepRef" >> beam.Map(lambda kv: (kv[0], kv[1][1]))
        )
        return records | "DropDuplicates" >> beam.ParDo(
            _DropDuplicatesFn(), duplicates=beam.pvalue.AsDict(duplicates)
        ).with_outputs(ERRORS, main="ok")
