"""Property-based tests (hypothesis) of decoding, caption normalisation, paths and the policy.

Arbitrary bytes, strings and records never raise out of the per-record functions:
each returns a result or raises :class:`RecordError` with a reason code, which the
DoFns turn into an ``errors/`` row that fits ``ERRORS_SCHEMA``. The decision policy
returns a decision consistent with its reason and its thresholds for any scores.
Examples are few (the suite runs on 2 shared cores) and the database is off so runs
are reproducible.

    .venv/bin/python -m pytest -q tests/test_properties.py
"""

from __future__ import annotations

import io
import os
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bad_inputs  # noqa: E402

from capgap.transforms import decide as policy  # noqa: E402
from capgap.transforms.decode import (  # noqa: E402
    CaptionConfig,
    DecodeConfig,
    DecodeFn,
    decode_image,
    decode_record,
    normalise_caption,
    resolve_image_path,
)
from capgap.transforms.reasons import (  # noqa: E402
    CURATED_REASONS,
    ERROR_REASONS,
    POLICY_REJECTIONS,
    Outcome,
    Reason,
    RecordError,
    outcome_of,
)
from capgap.transforms.schema import ERRORS_SCHEMA  # noqa: E402
from capgap.transforms.score import ScoreConfig, pair_scores  # noqa: E402

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

IMAGE_REASONS = {
    Reason.IMAGE_MISSING,
    Reason.IMAGE_EMPTY,
    Reason.IMAGE_BYTES_TOO_LARGE,
    Reason.IMAGE_UNDECODABLE,
    Reason.IMAGE_TRUNCATED,
    Reason.IMAGE_CORRUPT,
    Reason.IMAGE_TOO_LARGE,
    Reason.IMAGE_TOO_SMALL,
    Reason.IMAGE_BAD_ASPECT,
    Reason.IMAGE_MODE_UNSUPPORTED,
    Reason.COLUMN_TYPE_INVALID,
}
CAPTION_REASONS = {
    Reason.CAPTION_MISSING,
    Reason.CAPTION_NOT_UTF8,
    Reason.CAPTION_EMPTY,
    Reason.CAPTION_TOO_LONG,
    Reason.CAPTION_TYPE_INVALID,
}
SEEDS = [
    bad_inputs.valid_png(),
    bad_inputs.valid_jpeg(),
    bad_inputs.animated_gif(),
    bad_inputs.webp(),
    bad_inputs.png_16bit(),
    bad_inputs.palette_transparency(),
    bad_inputs.exif_rotated_jpeg(),
    bad_inputs.cmyk_jpeg(),
    bad_inputs._save(Image.new("RGB", (24, 24), (1, 2, 3)), "BMP"),
    bad_inputs._save(Image.new("RGB", (24, 24), (1, 2, 3)), "TIFF"),
]


def _check_decoded(result) -> None:
    h, w, c = result.pixels.shape
    assert c == 3 and result.pixels.dtype == np.uint8 and h >= 1 and w >= 1
    assert min(result.width, result.height) >= DecodeConfig().min_side
    stored = Image.open(io.BytesIO(result.data))
    assert stored.size == (result.width, result.height)


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image of some format with bytes flipped, cut, inserted or duplicated."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "zero_run"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[pos : pos + 32] = bytes(len(data[pos : pos + 32]))
        if not data:
            break
    return bytes(data)


@SETTINGS
@given(st.binary(max_size=2048))
def test_decode_image_arbitrary_bytes(data):
    try:
        result = decode_image(data, DecodeConfig())
    except RecordError as error:
        assert error.reason in IMAGE_REASONS, error.reason
        return
    _check_decoded(result)


@SETTINGS
@given(mutated_images())
def test_decode_image_mutated_valid_images(data):
    try:
        result = decode_image(data, DecodeConfig())
    except RecordError as error:
        assert error.reason in IMAGE_REASONS, (error.reason, error.message)
        return
    _check_decoded(result)


@SETTINGS
@given(st.integers(1, 200_000), st.integers(1, 200_000))
def test_decode_image_declared_size_is_bounded(width, height):
    """Whatever size a header declares, pixels beyond max_pixels are never decoded."""
    data = bad_inputs.png_declaring(width, height)
    cfg = DecodeConfig(max_pixels=1_000_000)
    try:
        result = decode_image(data, cfg)
    except RecordError as error:
        if width * height > cfg.max_pixels:
            assert error.reason == Reason.IMAGE_TOO_LARGE, error.reason
        return
    assert width * height <= cfg.max_pixels
    _check_decoded(result)


def _check_caption(text: str, notes: list[str], cfg: CaptionConfig) -> None:
    assert isinstance(text, str) and text
    assert text == text.strip() and "  " not in text
    assert 0 < len(text) <= cfg.max_chars
    assert not any(unicodedata.category(ch) == "Cc" for ch in text), repr(text)
    assert not any(ch in "\u200b\ufeff\u202e\u2066" for ch in text)
    text.encode("utf-8")  # no lone surrogates
    assert all(isinstance(n, str) for n in notes)


CAPTION_CONFIGS = st.sampled_from(
    [
        CaptionConfig(),
        CaptionConfig(max_chars=12),
        CaptionConfig(max_chars=12, on_too_long="truncate"),
    ]
)


@SETTINGS
@given(st.text(max_size=300), CAPTION_CONFIGS)
@example("a red\x00 cube\u200b\u202e on grass 👨‍👩‍👧", CaptionConfig())
@example("\ud800 lone surrogate", CaptionConfig())
def test_normalise_caption_text(raw, cfg):
    try:
        text, notes = normalise_caption(raw, cfg)
    except RecordError as error:
        assert error.reason in CAPTION_REASONS, error.reason
        return
    _check_caption(text, notes, cfg)
    again, _ = normalise_caption(text, CaptionConfig(max_chars=cfg.max_chars))
    assert unicodedata.normalize("NFC", again) == unicodedata.normalize("NFC", text)


@SETTINGS
@given(st.binary(max_size=300), CAPTION_CONFIGS)
def test_normalise_caption_bytes(raw, cfg):
    try:
        text, notes = normalise_caption(raw, cfg)
    except RecordError as error:
        assert error.reason in CAPTION_REASONS, error.reason
        if error.reason == Reason.CAPTION_NOT_UTF8:
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
        return
    _check_caption(text, notes, cfg)


@SETTINGS
@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    )
)
def test_normalise_caption_non_text(raw):
    with pytest.raises(RecordError) as info:
        normalise_caption(raw, CaptionConfig())
    expected = Reason.CAPTION_MISSING if raw is None else Reason.CAPTION_TYPE_INVALID
    assert info.value.reason == expected


def test_normalised_caption_is_nfc():
    """NFC after removing invisible characters: one visible caption, one string."""
    text, _ = normalise_caption("cafe\u200b\u0301", CaptionConfig())
    assert unicodedata.is_normalized("NFC", text), ascii(text)
    assert text == normalise_caption("caf\u00e9", CaptionConfig())[0]


PATHS = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(["..", ".", "a", "b.png", "", "/", "~", "%2e%2e", "\x00"]), max_size=6
    ).map("/".join),
    st.sampled_from(
        ["/etc/passwd", "file:///etc/passwd", "gs://bucket/x.png", "../outside/x.png", "a/../../x"]
    ),
)


@SETTINGS
@given(PATHS)
def test_resolve_image_path_stays_in_root(tmp_path_factory, path):
    root = tmp_path_factory.getbasetemp() / "prop_root"
    root.mkdir(exist_ok=True)
    real_root = os.path.realpath(root)
    try:
        full = resolve_image_path(path, str(root))
    except RecordError as error:
        assert error.reason in {Reason.PATH_INVALID, Reason.PATH_OUTSIDE_ROOT}, error.reason
        return
    assert full == real_root or full.startswith(real_root + os.sep), full


@SETTINGS
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=8), st.lists(st.none(), max_size=2)))
def test_resolve_image_path_non_text(path):
    with pytest.raises(RecordError) as info:
        resolve_image_path(path, "/tmp")
    assert info.value.reason == Reason.PATH_INVALID


RECORD_VALUES = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.sampled_from(SEEDS[:3]),
    st.text(max_size=20),
    st.integers(),
    st.floats(),
)


@st.composite
def records(draw) -> dict:
    record = {
        "uid": draw(st.one_of(st.text(max_size=12), st.integers())),
        "source": draw(st.text(max_size=12)),
        "source_index": draw(st.integers(-1, 10**6)),
        "image": draw(RECORD_VALUES),
        "image_path": draw(st.one_of(st.none(), st.text(max_size=20))),
        "caption": draw(st.one_of(RECORD_VALUES, st.text(max_size=60))),
        "columns": draw(st.dictionaries(st.text(max_size=4), RECORD_VALUES, max_size=2)),
        "image_root": draw(st.one_of(st.none(), st.just("/nonexistent-root"))),
        "error": draw(
            st.one_of(
                st.none(),
                st.tuples(
                    st.sampled_from(sorted(r.value for r in ERROR_REASONS)),
                    st.text(max_size=5),
                    st.text(max_size=20),
                ),
            )
        ),
    }
    return record


@SETTINGS
@given(records())
def test_decode_record_arbitrary_records(record):
    try:
        pair = decode_record(record, DecodeConfig(), CaptionConfig())
    except RecordError as error:
        assert isinstance(error.reason, Reason)
        return
    assert isinstance(pair["caption"], str) and pair["caption"]
    assert pair["pixels"].dtype == np.uint8


@SETTINGS
@given(records())
def test_decode_fn_yields_exactly_one_row(record):
    """The DoFn turns any record into one pair or one errors/ row that fits ERRORS_SCHEMA."""
    fn = DecodeFn(DecodeConfig(), CaptionConfig())
    fn.setup()
    out = list(fn.process((str(record["uid"]), record)))
    assert len(out) == 1
    element = out[0]
    if hasattr(element, "tag"):
        assert element.tag == "errors"
        row = element.value
        pa.Table.from_pylist([row], schema=ERRORS_SCHEMA)
        assert outcome_of(row["reason"]) == Outcome.ERROR
        if record.get("error"):
            assert row["reason"] == record["error"][0]
    else:
        uid, pair = element
        assert uid == str(record["uid"])
        assert record.get("error") is None


# --- the decision policy ----------------------------------------------------------------------

UNIT = st.floats(0.0, 1.0, allow_nan=False)
SCORES = st.fixed_dictionaries(
    {"certainty": UNIT, "imbalance": UNIT, "clip_score": st.floats(-1.0, 1.0, allow_nan=False)}
)
RULES = st.builds(
    policy.Rule,
    mode=st.sampled_from(["off", "absolute", "quantile", "top_fraction"]),
    value=UNIT,
)


@SETTINGS
@given(SCORES, RULES, RULES, RULES, st.lists(SCORES, min_size=1, max_size=40))
def test_decide_is_consistent(row, drop, drop_clip, recaption, population):
    cfg = policy.DecideConfig(drop=drop, drop_clip=drop_clip, recaption=recaption)
    hists = None
    if cfg.needs_quantiles():
        combine = policy.ScoreHistograms()
        acc = combine.create_accumulator()
        for other in population:
            acc = combine.add_input(acc, other)
        hists = combine.extract_output(acc)
    thresholds = policy.resolve_thresholds(cfg, hists)
    decision, reason = policy.decide(row, thresholds)
    assert isinstance(reason, Reason)
    if decision == policy.DROP:
        assert reason in POLICY_REJECTIONS
    elif decision == policy.RECAPTION:
        assert reason == Reason.HIGH_IMBALANCE
    else:
        assert decision == "keep" and reason == Reason.PASSED
    assert outcome_of(reason) in (Outcome.REJECTED, Outcome.CURATED)
    # The reason names the rule that fired, and a rule that is off never fires.
    if reason == Reason.LOW_CERTAINTY:
        assert thresholds["certainty"] is not None and row["certainty"] < thresholds["certainty"]
    if reason == Reason.LOW_CLIP_SCORE:
        assert thresholds["clip_score"] is not None and row["clip_score"] < thresholds["clip_score"]
    if reason in CURATED_REASONS and thresholds["certainty"] is not None:
        assert row["certainty"] >= thresholds["certainty"]


@SETTINGS
@given(st.lists(UNIT, min_size=1, max_size=200), st.floats(0.0, 1.0))
def test_quantile_drop_rule_drops_at_most_q(values, q):
    """drop at quantile q drops at most a fraction q of the rows it was computed on."""
    cfg = policy.DecideConfig(drop=policy.Rule("quantile", q), recaption=policy.Rule("off", 0.0))
    rows = [{"certainty": v, "imbalance": 0.0, "clip_score": 0.0} for v in values]
    combine = policy.ScoreHistograms()
    # Merge in two halves: the order of merging must not matter.
    halves = [combine.create_accumulator(), combine.create_accumulator()]
    for i, row in enumerate(rows):
        halves[i % 2] = combine.add_input(halves[i % 2], row)
    hists = combine.extract_output(combine.merge_accumulators(halves))
    thresholds = policy.resolve_thresholds(cfg, hists)
    dropped = sum(policy.decide(row, thresholds)[0] == policy.DROP for row in rows)
    assert dropped <= q * len(rows) + 1e-9, (dropped, q, len(rows), thresholds["certainty"])


@SETTINGS
@given(
    st.integers(2, 16).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.floats(-1, 1, allow_nan=False), min_size=8 * n + 8, max_size=8 * n + 8),
        )
    ),
    st.floats(0.005, 2.0),
    st.sampled_from(["rank", "margin"]),
)
def test_pair_scores_stay_in_range(data, tau, certainty):
    n, flat = data
    vectors = np.asarray(flat, np.float64).reshape(n + 1, 8)
    assume(np.all(np.linalg.norm(vectors, axis=1) > 1e-3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    image, bank = vectors[0], vectors[1:]
    text = vectors[-1]
    scores = pair_scores(image, text, bank, tau, ScoreConfig(certainty=certainty), exclude=0)
    assert all(np.isfinite(v) for v in scores.values()), scores
    assert -1.0 - 1e-6 <= scores["clip_score"] <= 1.0 + 1e-6
    assert 0.0 <= scores["certainty"] <= 1.0
    assert 0.0 <= scores["imbalance"] <= 1.0 + 1e-9
