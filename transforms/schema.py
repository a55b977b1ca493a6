"""Every column ``capgap curate`` writes, in one place; the input's reserved names follow.

Two row shapes leave the pipeline:

- ``curated/`` and ``rejected/`` rows, one schema (so the two folders read as one table):
  :data:`ROW_FIELDS`, the recaption stage's :data:`RECAPTION_FIELDS` (null on rows it did
  not see: every rejected row), then the input's passthrough columns;
- ``errors/`` rows: :data:`ERRORS_SCHEMA` (a reference to the record, no image).

``image`` is Hugging Face's ``Image()`` storage, ``struct<bytes: binary, path: string>``
(:data:`IMAGE_TYPE`), and every schema carries the ``huggingface`` metadata key that
``datasets`` writes (:func:`with_hf_features`), so ``datasets`` loads ``image`` as an
``Image()`` feature; pyarrow, polars and DuckDB read the struct as it is.

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
CARD = "README.md"  # the Hugging Face dataset card (transforms/card.py)
WEBDATASET = f"{CURATED}-wds"  # curated rows as WebDataset tar shards (write.formats)

#: Hugging Face ``datasets``' storage of an ``Image()`` feature (``path`` null: the bytes
#: are embedded). :func:`image_cell` makes a cell of it.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

#: Columns every curated / rejected row has, before the passthrough columns.
ROW_FIELDS: list[pa.Field] = [
    pa.field("uid", pa.string(), nullable=False),
    pa.field("image", IMAGE_TYPE, nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("original_caption", pa.string(), nullable=False),
    pa.field("caption_source", pa.string(), nullable=False),
    pa.field("decision", pa.string(), nullable=False),  # keep | recaption | drop
    pa.field("reason", pa.string(), nullable=False),  # passed | high_imbalance | low_...
    pa.field("clip_score", pa.float32(), nullable=False),
    pa.field("certainty", pa.float32(), nullable=False),
    pa.field("imbalance", pa.float32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("image_format", pa.string(), nullable=False),  # of the stored bytes: JPEG|PNG|WEBP
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("decode_notes", pa.string(), nullable=False),
    pa.field("image_path", pa.string(), nullable=True),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_index", pa.int64(), nullable=False),
]

#: Columns the recaption stage adds (None on rows it did not see: every rejected row, and
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


def image_cell(data: bytes) -> dict[str, bytes | None]:
    """One ``image`` cell: encoded image bytes in :data:`IMAGE_TYPE`'s shape."""
    return {"bytes": data, "path": None}


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """``schema`` as ``datasets`` writes it (``Features.arrow_schema``): the ``huggingface``
    metadata key with every column's feature (``image`` as ``Image()``), every field
    nullable. ``datasets`` takes a feature from the metadata only when the file's field
    equals the feature's own, nullability included; the ``nullable=False`` of
    :data:`ROW_FIELDS` stays capgap's promise, not the files' schema."""
    import datasets

    known = {}
    for f in schema:  # a passthrough type datasets has no feature for (map) is left out
        try:
            known[f.name] = datasets.Features.from_arrow_schema(pa.schema([f]))[f.name]
        except (ValueError, TypeError, NotImplementedError):
            continue
    features = datasets.Features(known)
    if "image" in features:
        features["image"] = datasets.Image()
    fields = [f.with_nullable(True) for f in schema]
    return pa.schema(fields, metadata=features.arrow_schema.metadata)


def row_schema(passthrough: pa.Schema, extra: list[pa.Field] | None = None) -> pa.Schema:
    """The curated / rejected schema: ROW_FIELDS, ``extra`` (the recaption columns), then
    passthrough columns; with the ``huggingface`` metadata."""
    return with_hf_features(pa.schema([*ROW_FIELDS, *(extra or []), *passthrough]))


if __name__ == "__main__":
    print(f"{CURATED}/, {REJECTED}/ (+ passthrough columns):")
    print(f"{row_schema(pa.schema([]), recaption_fields())}\n")
    print(f"{ERRORS}/:\n{ERRORS_SCHEMA}")
