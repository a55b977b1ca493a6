"""Every column ``capgap curate`` writes, in one place; the input's reserved names follow.

Three row shapes leave the pipeline:

- ``curated/`` and ``rejected/`` rows: :data:`ROW_FIELDS`, then (curated only) the
  recaption stage's :data:`RECAPTION_FIELDS`, then the input's passthrough columns;
- ``errors/`` rows: :data:`ERRORS_SCHEMA` (a reference to the record, no image).

An input column whose name capgap writes itself is kept as ``input_<name>``
(:data:`RESERVED_COLUMNS`, derived from the schemas here, so the two cannot drift).
The folder and file names of a build are here too.

    python -m capgap.transforms.schema      # prints the three schemas
"""

from __future__ import annotations

import pyarrow as pa

from capgap.transforms.reasons import Outcome

CURATED, REJECTED, ERRORS = (Outcome.CURATED.value, Outcome.REJECTED.value, Outcome.ERROR.value)
OUTPUTS: tuple[str, ...] = (CURATED, REJECTED, ERRORS)
MANIFEST = "manifest.json"

#: Columns every curated / rejected row has, before the passthrough columns.
ROW_FIELDS: list[pa.Field] = [
    pa.field("uid", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("original_caption", pa.string(), nullable=False),
    pa.field("caption_source", pa.string(), nullable=False),
    pa.field("decision", pa.string(), nullable=False),  # keep | recaption | drop
    pa.field("reason", pa.string(), nullable=False),  # passed | high_imbalance | low_...
    pa.field("clip_score", pa.float32(), nullable=False),
    pa.field("certainty", pa.float32(), nullable=False),
    pa.field("imbalance", pa.float32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("image_format", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("decode_notes", pa.string(), nullable=False),
    pa.field("image_path", pa.string(), nullable=True),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_index", pa.int64(), nullable=False),
]

#: Columns the recaption stage adds to curated rows (None on rows it did not see, and on
#: every row when it did not run). ``transforms/recaption.py`` documents their values.
RECAPTION_FIELDS: list[pa.Field] = [
    pa.field("recaption_status", pa.string(), nullable=True),
    pa.field("recaption_error", pa.string(), nullable=True),
    pa.field("gate_clip_score_new", pa.float32(), nullable=True),
    pa.field("gate_clip_score_original", pa.float32(), nullable=True),
]

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_index", pa.int64(), nullable=False),
        pa.field("image_path", pa.string(), nullable=True),
        pa.field("stage", pa.string(), nullable=False),  # read | dedup | decode | embed | score
        pa.field("reason", pa.string(), nullable=False),
        pa.field("error_class", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("caption_preview", pa.string(), nullable=True),  # first 200 chars, if text
        pa.field("image_num_bytes", pa.int64(), nullable=True),
    ]
)

#: Every column name capgap writes itself; input columns of these names become
#: ``input_<name>``.
RESERVED_COLUMNS: frozenset[str] = frozenset(
    f.name for f in [*ROW_FIELDS, *RECAPTION_FIELDS, *ERRORS_SCHEMA]
)


def recaption_fields(output_column: str = "caption") -> list[pa.Field]:
    """:data:`RECAPTION_FIELDS`, plus the dense-caption column when it is not ``caption``."""
    extra = [] if output_column == "caption" else [pa.field(output_column, pa.string())]
    return [*RECAPTION_FIELDS, *extra]


def row_schema(passthrough: pa.Schema, extra: list[pa.Field] | None = None) -> pa.Schema:
    """The curated / rejected schema: ROW_FIELDS, optional extras, then passthrough columns."""
    return pa.schema([*ROW_FIELDS, *(extra or []), *passthrough])


if __name__ == "__main__":
    print(f"{CURATED}/, {REJECTED}/ (+ passthrough columns):\n{row_schema(pa.schema([]))}\n")
    print(f"{CURATED}/ only (recaption stage):\n{pa.schema(RECAPTION_FIELDS)}\n")
    print(f"{ERRORS}/:\n{ERRORS_SCHEMA}")
