"""Every outcome and reason code of ``capgap curate``, in one place.

Each input record ends in exactly one outcome (``curated``, ``rejected`` or
``errors``) with a reason code from :class:`Reason`. Readers, decoding,
scoring and the decision policy all name their failures with these codes, so
``errors/`` and ``rejected/`` can be grouped and counted without parsing
messages. ``python -m capgap.transforms.reasons`` prints the table.
"""

from __future__ import annotations

import enum
import re
from typing import Any


class Outcome(str, enum.Enum):
    """Where a record ends up."""

    CURATED = "curated"
    REJECTED = "rejected"
    ERROR = "errors"


class Stage(str, enum.Enum):
    """The pipeline stage that produced an error row."""

    READ = "read"
    DEDUP = "dedup"
    DECODE = "decode"
    EMBED = "embed"
    SCORE = "score"


class Reason(str, enum.Enum):
    """Why a record went to ``errors/`` or ``rejected/`` (or how it was curated)."""

    # --- reading a shard or a record (errors/) ----------------------------------------------
    SHARD_UNREADABLE = "shard_unreadable"  # the file cannot be opened or parsed at all
    SHARD_TRUNCATED = "shard_truncated"  # a stream shard (tar, csv) broke off part-way
    RECORD_UNREADABLE = "record_unreadable"  # one row group / tar member could not be read
    RECORD_MALFORMED = "record_malformed"  # a CSV line with the wrong number of fields, ...
    COLUMN_MISSING = "column_missing"  # the image or caption column is absent in this shard
    COLUMN_TYPE_INVALID = "column_type_invalid"  # a column has a type we cannot use
    METADATA_INVALID = "metadata_invalid"  # a WebDataset .json member is not UTF-8 JSON
    DUPLICATE_UID = "duplicate_uid"  # a later record with a uid already seen
    SOURCE_FAILED = "source_failed"  # the tool that made the input failed the row (img2dataset)
    # --- image paths (errors/) ----------------------------------------------------------------
    PATH_INVALID = "path_invalid"  # empty path, NUL byte, not a string
    PATH_OUTSIDE_ROOT = "path_outside_root"  # resolves outside the configured image root
    PATH_MISSING = "path_missing"  # no file at the path
    PATH_UNREADABLE = "path_unreadable"  # the file exists but cannot be read
    # --- images (errors/) ---------------------------------------------------------------------
    IMAGE_MISSING = "image_missing"  # neither image bytes nor a path (null cell, no tar member)
    IMAGE_EMPTY = "image_empty"  # zero bytes
    IMAGE_BYTES_TOO_LARGE = "image_bytes_too_large"  # encoded size above decode.max_bytes
    IMAGE_UNDECODABLE = "image_undecodable"  # not an image format PIL recognises
    IMAGE_TRUNCATED = "image_truncated"  # the header decodes, the pixel data ends early
    IMAGE_CORRUPT = "image_corrupt"  # the header decodes, the pixel data is broken
    IMAGE_TOO_LARGE = "image_too_large"  # more pixels than decode.max_pixels (bomb guard)
    IMAGE_TOO_SMALL = "image_too_small"  # shorter side below decode.min_side
    IMAGE_BAD_ASPECT = "image_bad_aspect"  # long/short side above decode.max_aspect_ratio
    IMAGE_MODE_UNSUPPORTED = "image_mode_unsupported"  # a PIL mode we cannot map to RGB
    # --- captions (errors/) -------------------------------------------------------------------
    CAPTION_MISSING = "caption_missing"  # null cell, no .txt member
    CAPTION_NOT_UTF8 = "caption_not_utf8"  # bytes that are not valid UTF-8
    CAPTION_EMPTY = "caption_empty"  # nothing left after normalisation
    CAPTION_TOO_LONG = "caption_too_long"  # above caption.max_chars (on_too_long: reject)
    CAPTION_TYPE_INVALID = "caption_type_invalid"  # a number, a list, ... instead of text
    # --- model (errors/) ----------------------------------------------------------------------
    INFERENCE_FAILED = "inference_failed"  # the embedding batch raised
    EMBEDDING_NONFINITE = "embedding_nonfinite"  # NaN / inf in an embedding
    INTERNAL_ERROR = "internal_error"  # an unexpected exception in a per-record step
    # --- decision policy (rejected/) ----------------------------------------------------------
    LOW_CERTAINTY = "low_certainty"  # the caption does not point at this image
    LOW_CLIP_SCORE = "low_clip_score"  # image-caption similarity below the floor
    # --- decision policy (curated/) -----------------------------------------------------------
    HIGH_IMBALANCE = "high_imbalance"  # kept and marked for recaptioning
    PASSED = "passed"  # kept as is


#: Reasons that put a record in ``rejected/`` (policy), as opposed to ``errors/`` (failure).
POLICY_REJECTIONS: frozenset[Reason] = frozenset({Reason.LOW_CERTAINTY, Reason.LOW_CLIP_SCORE})
#: Reasons carried by curated rows.
CURATED_REASONS: frozenset[Reason] = frozenset({Reason.HIGH_IMBALANCE, Reason.PASSED})
#: Reasons that put a record in ``errors/``.
ERROR_REASONS: frozenset[Reason] = frozenset(Reason) - POLICY_REJECTIONS - CURATED_REASONS


def outcome_of(reason: Reason | str) -> Outcome:
    """The outcome a reason code implies."""
    reason = Reason(reason)
    if reason in POLICY_REJECTIONS:
        return Outcome.REJECTED
    if reason in CURATED_REASONS:
        return Outcome.CURATED
    return Outcome.ERROR


class RecordError(Exception):
    """A per-record failure with a reason code; decode turns it into an ``errors/`` row."""

    def __init__(self, reason: Reason, message: str, error_class: str | None = None) -> None:
        super().__init__(message)
        self.reason = Reason(reason)
        self.message = message
        self.error_class = error_class or type(self).__name__


# --- errors/ rows ---------------------------------------------------------------------------

_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def exception_message(err: BaseException) -> str:
    """An exception's text without object reprs (they carry memory addresses, which would
    make errors/ rows differ between runs over the same input)."""
    return _ADDRESS.sub("<data>", str(err)) or type(err).__name__


def _preview(caption: Any) -> str | None:
    if isinstance(caption, str):
        text = caption
    elif isinstance(caption, bytes | bytearray | memoryview):
        text = bytes(caption[:800]).decode("utf-8", errors="backslashreplace")
    else:
        return None
    return text[:200].encode("utf-8", errors="backslashreplace").decode("utf-8")


def _safe_text(value: Any) -> str:
    return str(value).encode("utf-8", errors="backslashreplace").decode("utf-8")


def error_row(
    record: dict[str, Any],
    stage: Stage | str,
    reason: Reason | str,
    error_class: str,
    message: str,
) -> dict[str, Any]:
    """An ``errors/`` row: where the record came from and why it failed (no image bytes)."""
    image = record.get("image")
    path = record.get("image_path")
    return {
        "uid": _safe_text(record.get("uid", "")),
        "source": _safe_text(record.get("source", "")),
        "source_index": int(record.get("source_index", -1)),
        "image_path": _safe_text(path) if path is not None else None,
        "stage": Stage(stage).value,
        "reason": Reason(reason).value,
        "error_class": _safe_text(error_class),
        "message": _safe_text(message)[:2000],
        "caption_preview": _preview(record.get("caption")),
        "image_num_bytes": len(image) if isinstance(image, bytes) else None,
    }


if __name__ == "__main__":
    for code in Reason:
        print(f"{code.value:<24} {outcome_of(code).value}")
