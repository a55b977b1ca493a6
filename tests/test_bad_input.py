"""Bad input through every reader: each row lands in errors/ (or curated/) with a specific reason.

The corpus comes from ``tests/bad_inputs.py`` (generated, never downloaded). One
pipeline run per reader (ReadRecords -> DropDuplicateUids -> DecodeRecords under
TestPipeline) is shared by all of that reader's cases through a module-scoped
fixture; each case is then one test, named ``[reader-kind]``. Rows that must be
curated are checked for the conversion (RGB mode, EXIF rotation, alpha over white,
first GIF frame, 16-bit scaling, caption clean-up).

    .venv/bin/python -m pytest -q tests/test_bad_input.py
"""

from __future__ import annotations

import re
from pathlib import Path

import bad_inputs
import numpy as np
import pyarrow as pa
import pytest
from bad_inputs import CURATED, ERRORS, KINDS, READERS, stored_image

from capgap.transforms.decode import DecodeConfig, decode_image
from capgap.transforms.reasons import Reason, Stage, outcome_of
from capgap.transforms.schema import ERRORS_SCHEMA

#: (kind, reader) -> why the case is expected to fail until someone else's file is fixed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}
#: Readers on which the corpus crashes something (a driver or the pipeline).
CRASHING_READERS: dict[str, str] = {}
#: Readers that silently lose rows (not every input row has an output row).
LOSSY_READERS: dict[str, str] = {}


def _case_params() -> list:
    params = []
    for reader in READERS:
        for kind in bad_inputs.kinds_for(reader):
            marks = []
            if (kind, reader) in KNOWN_BUGS:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[(kind, reader)]))
            params.append(pytest.param(reader, kind, id=f"{reader}-{kind}", marks=marks))
    return params


def _reader_params(bugs: dict[str, str]) -> list:
    return [
        pytest.param(
            reader,
            id=reader,
            marks=[pytest.mark.xfail(strict=True, reason=bugs[reader])] if reader in bugs else [],
        )
        for reader in READERS
    ]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """reader -> (corpus, DecodeRun); one pipeline run per reader, shared by its cases."""
    cache: dict[str, tuple] = {}

    def get(reader: str):
        if reader not in cache:
            root = tmp_path_factory.mktemp(f"bad_{reader}")
            corpus = bad_inputs.build(reader, root / "input")
            cache[reader] = corpus, bad_inputs.run_read_decode(corpus, root / "out")
        return cache[reader]

    return get


def test_corpus_has_enough_kinds():
    assert len(KINDS) >= 25
    for reader in READERS:
        assert len(bad_inputs.kinds_for(reader)) >= 25, reader
    # Every image / caption / read / path reason the readers and decoding can give is covered.
    expected_reasons = {r for kind_cases in _all_expected() for r in kind_cases}
    wanted = {
        Reason.SHARD_UNREADABLE,
        Reason.SHARD_TRUNCATED,
        Reason.RECORD_UNREADABLE,
        Reason.RECORD_MALFORMED,
        Reason.COLUMN_MISSING,
        Reason.COLUMN_TYPE_INVALID,
        Reason.METADATA_INVALID,
        Reason.DUPLICATE_UID,
        Reason.PATH_OUTSIDE_ROOT,
        Reason.PATH_MISSING,
        Reason.IMAGE_MISSING,
        Reason.IMAGE_EMPTY,
        Reason.IMAGE_BYTES_TOO_LARGE,
        Reason.IMAGE_UNDECODABLE,
        Reason.IMAGE_TRUNCATED,
        Reason.IMAGE_CORRUPT,
        Reason.IMAGE_TOO_LARGE,
        Reason.IMAGE_TOO_SMALL,
        Reason.IMAGE_BAD_ASPECT,
        Reason.CAPTION_MISSING,
        Reason.CAPTION_NOT_UTF8,
        Reason.CAPTION_EMPTY,
        Reason.CAPTION_TOO_LONG,
        Reason.CAPTION_TYPE_INVALID,
    }
    assert {r.value for r in wanted} <= expected_reasons


def _all_expected() -> list[tuple[str, ...]]:
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for reader in ("parquet", "webdataset", "csv"):
            corpus = bad_inputs.build(reader, Path(tmp) / reader)
            out += [c.expected.reasons for c in corpus.cases]
    return out


@pytest.mark.parametrize("reader,kind", _case_params())
def test_bad_input_lands_with_reason(decoded, reader, kind):
    corpus, run = decoded(reader)
    landed = run.landed()
    check = KINDS[kind].check
    problems = []
    for case in corpus.cases_of(kind):
        where = f"{case.source}#{case.index}"
        if case.pattern in run.driver_errors:
            problems.append(f"{where}: no output, {run.driver_errors[case.pattern]}")
            continue
        got = landed.get((case.source, case.index), [])
        if len(got) != 1:
            summary = [(o, r, row.get("message", "")[:120]) for o, r, row in got]
            problems.append(f"{where}: expected one output row, got {summary}")
            continue
        outcome, reason, row = got[0]
        if not case.expected.matches(outcome, reason):
            problems.append(
                f"{where}: expected {case.expected.outcome}/{'|'.join(case.expected.reasons)}, "
                f"got {outcome}/{reason}: {row.get('message', '')[:200]}"
            )
            continue
        if outcome == ERRORS:
            assert row["stage"] in {s.value for s in Stage}
            assert row["message"] and row["error_class"], row
            assert row["image_num_bytes"] is None or row["image_num_bytes"] >= 0
        elif check is not None and case.expected.outcome == CURATED:
            try:
                check(row)
            except AssertionError as error:
                problems.append(f"{where}: converted wrongly: {error}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("reader", _reader_params(CRASHING_READERS))
def test_reader_never_crashes(decoded, reader):
    _, run = decoded(reader)
    assert not run.driver_errors, run.driver_errors


@pytest.mark.parametrize("reader", READERS)
def test_accounting_rows_in_equals_outputs(decoded, reader):
    """rows_in == curated + rejected + errors, and every output row is a known input row."""
    corpus, run = decoded(reader)
    assert run.rows_in == len(run.ok) + len(run.errors)
    known = corpus.by_ref()
    unknown = [ref for ref in run.landed() if ref not in known]
    assert not unknown, f"output rows that match no input row: {unknown}"
    doubled = {ref: len(rows) for ref, rows in run.landed().items() if len(rows) > 1}
    assert not doubled, f"input rows with more than one output row: {doubled}"


@pytest.mark.parametrize("reader", _reader_params(LOSSY_READERS))
def test_nothing_silently_dropped(decoded, reader):
    corpus, run = decoded(reader)
    landed = run.landed()
    lost = [
        f"{c.kind} {c.source}#{c.index}"
        for c in corpus.cases
        if c.pattern not in run.driver_errors and (c.source, c.index) not in landed
    ]
    assert not lost, f"input rows without any output row: {lost}"


@pytest.mark.parametrize("reader", READERS)
def test_error_rows_fit_the_errors_schema(decoded, reader):
    _, run = decoded(reader)
    table = pa.Table.from_pylist(run.errors, schema=ERRORS_SCHEMA)
    assert table.num_rows == len(run.errors)
    for row in run.errors:
        Reason(row["reason"])  # a known code
        row["message"].encode("utf-8")  # writable as Parquet text


@pytest.mark.parametrize("reader", READERS)
def test_escaping_paths_never_read(decoded, reader):
    """A path outside the root is refused before the file is opened (no bytes recorded)."""
    _, run = decoded(reader)
    for row in run.errors:
        if row["reason"] == Reason.PATH_OUTSIDE_ROOT.value:
            assert row["image_num_bytes"] is None
            assert row["stage"] == Stage.DECODE.value


def test_valid_rows_are_not_substituted(decoded):
    """A decoded row keeps its own pixels: never a blank or another row's image."""
    _, run = decoded("parquet")
    for pair in run.ok:
        pixels = np.asarray(pair["pixels"])
        assert pixels.std() > 0 or pair["uid"] in {"grayscale", "cmyk_jpeg", "animated_gif"}


def test_dark_16bit_png_stays_dark():
    """16-bit value 200 is 0.3% of full scale: it must come out near black, not as 8-bit 200."""
    data = bad_inputs._save(bad_inputs.Image.fromarray(np.full((32, 32), 200, np.uint16)), "PNG")
    image = decode_image(data, DecodeConfig())
    assert int(image.pixels.max()) <= 1, image.pixels.max()


def test_bad_data_doc_lists_every_reason():
    """The README's "What happens to bad data" has one table row per Reason, with its outcome."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## What happens to bad data", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (\w+) \| ([^|]+) \| (.+) \|$", section, re.M)
    documented = [code for code, *_ in rows]
    assert sorted(documented) == sorted(r.value for r in Reason), (
        f"missing: {sorted({r.value for r in Reason} - set(documented))}, "
        f"unknown or repeated: {[c for c in documented if documented.count(c) > 1 or c not in {r.value for r in Reason}]}"
    )
    for code, outcome, _stage, trigger in rows:
        assert outcome == outcome_of(code).value, (code, outcome)
        assert len(trigger.strip()) > 20, f"{code}: say what triggers it"


# --- the same corpus through `capgap curate` (read, decode, embed, score, decide, write) --------

CURATE_READER = "parquet"


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    return bad_inputs.reference_build(tmp_path_factory.getbasetemp(), CURATE_READER)


@pytest.mark.parametrize("kind", bad_inputs.kinds_for(CURATE_READER))
def test_curate_lands_bad_input(curated, kind):
    """End to end: the row is in the right Parquet folder with the reason, images converted."""
    corpus, built = curated
    landed = built.landed()
    check = KINDS[kind].check
    problems = []
    for case in corpus.cases_of(kind):
        where = f"{case.source}#{case.index}"
        expected = bad_inputs.curated_ok() if case.expected.outcome == CURATED else case.expected
        got = landed.get((case.source, case.index), [])
        if len(got) != 1:
            problems.append(f"{where}: expected one output row, got {[g[:2] for g in got]}")
            continue
        folder, reason, row = got[0]
        if folder == "rejected":
            folder = CURATED  # a policy drop of a valid row: same row schema, same checks
        if not expected.matches(folder, reason):
            problems.append(f"{where}: expected {expected}, got {got[0][:2]}")
        elif folder == CURATED and check is not None:
            try:
                check(row)
            except AssertionError as error:
                problems.append(f"{where}: converted wrongly: {error}")
    assert not problems, "\n".join(problems)


def test_curate_accounting_and_manifest(curated):
    corpus, built = curated
    counts = built.manifest["counts"]
    n_rows = {folder: len(rows) for folder, rows in built.rows.items()}
    total = sum(n_rows.values())
    assert built.metrics["rows_in"] == len(corpus.cases) == total
    assert counts["rows_in"] == counts["curated"] + counts["rejected"] + counts["errors"] == total
    for folder in ("curated", "rejected", "errors"):
        assert counts[folder] == n_rows.get(folder, 0), folder
        by_reason: dict[str, int] = {}
        for row in built.rows.get(folder, []):
            by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
        assert counts["by_reason"][folder] == by_reason, folder
        assert built.manifest["outputs"][folder] == [
            f"{folder}/{name}" for name in built.files.get(folder, [])
        ]
    assert not built.stray, built.stray
    for row in built.rows.get("curated", []) + built.rows.get("rejected", []):
        # image_format names the stored bytes, whatever the source was (CMYK, 16-bit,
        # palette, animated, EXIF-rotated, WebP, ...)
        assert row["image_format"] == stored_image(row).format, row["uid"]
    uids = [row["uid"] for rows in built.rows.values() for row in rows]
    assert len(uids) == len(set(uids)) + 1  # the duplicate uid appears once kept, once in errors
