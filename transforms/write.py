"""Parquet sinks, the dataset card and the manifest of ``capgap curate``.

Under one output prefix a build writes::

    curated/part-SSSSS-of-NNNNN.parquet    kept + recaption rows: ROW schema + passthrough
    rejected/part-SSSSS-of-NNNNN.parquet   policy drops: the same schema, decision "drop"
    errors/part-SSSSS-of-NNNNN.parquet     failures: ERRORS_SCHEMA (a reference, no image)
    curated-wds/shard-SSSSS.tar            with write.formats [.., webdataset] (wds_write.py)
    README.md                              Hugging Face dataset card: configs (card.py)
    manifest.json                          written last: counts, config, models, versions

Each sink is Beam's ``WriteToParquetBatched`` with an explicit pyarrow schema, fed
by :class:`RowsToArrowFn`, which builds the Arrow columns straight from the row dicts
(``WriteToParquet``'s own row-by-row converter costs several times more); the
passthrough columns (the input's other columns, e.g. DataComp metadata or the
synthetic world's labels) are appended to the row schema, typed as discovered by
:func:`capgap.transforms.readers.discover`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from capgap.transforms.card import dataset_card
from capgap.transforms.schema import (
    CARD,
    CURATED,
    ERRORS,
    IMAGE_TYPE,
    MANIFEST,
    OUTPUTS,
    REJECTED,
    WEBDATASET,
    image_cell,
)

FORMATS = ("parquet", "webdataset")


@dataclass
class WriteConfig:
    """What a build writes besides rejected/ and errors/ (always Parquet).

    ``formats``: ``parquet`` (curated/ as Parquet, always written: train, eval and the
    dataset card read it) and optionally ``webdataset`` (curated rows also as tar shards
    under ``curated-wds/``, :mod:`capgap.transforms.wds_write`), whose shard count is
    ``num_shards`` when set, else the curated rows / ``webdataset_samples_per_shard``.
    """

    formats: list[str] = field(default_factory=lambda: ["parquet"])
    webdataset_samples_per_shard: int = 10_000

    def __post_init__(self) -> None:
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ValueError(f"write.formats: unknown {unknown}; choose from {list(FORMATS)}")
        if "parquet" not in self.formats:
            raise ValueError("write.formats must include parquet (train and eval read it)")
        if self.webdataset_samples_per_shard < 1:
            raise ValueError("write.webdataset_samples_per_shard must be >= 1")


def record_batch(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    """Rows -> one RecordBatch of ``schema``, built column by column.

    A column is the row's own key of that name, else the passthrough value in
    ``row["columns"]`` (None when neither holds it); image bytes become
    :data:`~capgap.transforms.schema.IMAGE_TYPE` cells.
    """
    passthrough = [row.get("columns") or {} for row in rows]
    arrays = []
    for name, tp in zip(schema.names, schema.types, strict=True):
        values = [
            row[name] if name in row else extra.get(name)
            for row, extra in zip(rows, passthrough, strict=True)
        ]
        if tp == IMAGE_TYPE:
            arrays.append(_image_array(values))
        else:
            arrays.append(pa.array(values, type=tp))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _image_array(values: list[Any]) -> pa.Array:
    """An IMAGE_TYPE column: bytes become cells (path null), cells and None stay as they are.
    All bytes (every curated row): the struct is assembled from one binary array rather
    than converted from a dict a row."""
    if all(type(v) is bytes for v in values):
        data = pa.array(values, type=pa.binary())
        return pa.StructArray.from_arrays(
            [data, pa.nulls(len(values), pa.string())], fields=list(IMAGE_TYPE)
        )
    return pa.array([image_cell(v) if isinstance(v, bytes) else v for v in values], IMAGE_TYPE)


class ArrowTableCoder(beam.coders.Coder):
    """pyarrow Tables as Arrow IPC streams (schema metadata kept), sized by ``Table.nbytes``.

    Registered for ``pa.Table`` below. Without it a PCollection of Tables gets Beam's pickle
    fallback, and the runner's size sampling (every one of the first elements of each
    PCollection) pickles whole row groups, image bytes and all: a copy of every curated row.
    """

    def encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(encoded).read_all()

    def estimate_size(self, table: pa.Table) -> int:
        return table.nbytes

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return pa.Table


beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


@beam.typehints.with_output_types(pa.Table)
class RowsToArrowFn(beam.DoFn):
    """Row dicts -> pyarrow Tables, each one Parquet row group of about ``row_group_bytes``.

    Rows are converted ``batch_rows`` at a time; a Table is emitted once the converted
    batches reach ``row_group_bytes`` (Beam's ``WriteToParquet`` default, 64 MiB) and at
    the end of the bundle. Bounded (batch) input only, like ``WriteToParquet``.
    """

    def __init__(
        self, schema: pa.Schema, batch_rows: int = 256, row_group_bytes: int = 64 << 20
    ) -> None:
        self.schema, self.batch_rows, self.row_group_bytes = schema, batch_rows, row_group_bytes

    def start_bundle(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0

    def _convert(self) -> None:
        if self._rows:
            batch = record_batch(self._rows, self.schema)
            self._rows = []
            self._batches.append(batch)
            self._bytes += batch.nbytes

    def _table(self) -> pa.Table:
        table = pa.Table.from_batches(self._batches, schema=self.schema)
        self._batches, self._bytes = [], 0
        return table

    def process(self, row: dict[str, Any]) -> Iterator[pa.Table]:
        self._rows.append(row)
        if len(self._rows) >= self.batch_rows:
            self._convert()
            if self._bytes >= self.row_group_bytes:
                yield self._table()

    def finish_bundle(self) -> Iterator[Any]:
        self._convert()
        if self._batches:
            yield GlobalWindows.windowed_value_at_end_of_window(self._table())


def shard_of(uid: str, num_shards: int) -> int:
    """The output shard of a uid: a stable hash, the same on every run, runner and worker."""
    digest = hashlib.blake2b(uid.encode("utf-8", "backslashreplace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


class WriteParquet(beam.PTransform):
    """Rows -> ``<output>/<name>/part-SSSSS-of-NNNNN.parquet``; returns the final file names.

    ``num_shards == 0``: one ``WriteToParquet`` and the runner picks the sharding.
    ``num_shards > 0``: rows are partitioned by a hash of their uid and each partition
    is one ``WriteToParquet`` with a single shard, so a uid lands in the same file on
    every run (``WriteToParquet``'s own fixed sharding starts each bundle's round
    robin at a random shard). Meant for tens to a few hundred shards.
    """

    def __init__(self, output: str, name: str, schema: pa.Schema, num_shards: int = 0) -> None:
        super().__init__()
        self.output, self.name, self.schema, self.num_shards = output, name, schema, num_shards

    def _sink(self, prefix: str, num_shards: int, template: str | None):
        return beam.io.WriteToParquetBatched(
            prefix,
            schema=self.schema,
            file_name_suffix=".parquet",
            num_shards=num_shards,
            shard_name_template=template,
            codec="snappy",
        )

    def expand(self, rows):
        folder = posixpath.join(self.output, self.name)
        n = self.num_shards
        if n == 0:
            tables = rows | "ToArrow" >> beam.ParDo(RowsToArrowFn(self.schema))
            return tables | "Write" >> self._sink(posixpath.join(folder, "part"), 0, None)
        parts = rows | "ByUid" >> beam.Partition(lambda row, k: shard_of(row["uid"], k), n)
        written = [
            parts[i]
            | f"ToArrow{i:05d}" >> beam.ParDo(RowsToArrowFn(self.schema))
            | f"Write{i:05d}"
            >> self._sink(posixpath.join(folder, f"part-{i:05d}-of-{n:05d}"), 1, "")
            for i in range(n)
        ]
        return written | "Files" >> beam.Flatten()


def clear_outputs(output: str) -> list[str]:
    """Delete a previous build under ``output``: the output folders (part files and any
    ``beam-temp-*`` left by a killed run), the card and the manifest. Returns what went."""
    doomed = []
    for name in (*OUTPUTS, WEBDATASET):
        folder = posixpath.join(output, name)
        if "://" not in folder:
            if os.path.isdir(folder):
                doomed.append(folder)
        elif FileSystems.match([folder + "/**"])[0].metadata_list:
            doomed.append(folder + "/")
    patterns = [posixpath.join(output, name) for name in (MANIFEST, CARD)]
    patterns += [posixpath.join(output, name + ".tmp-*") for name in (MANIFEST, CARD)]
    doomed += [m.path for r in FileSystems.match(patterns) for m in r.metadata_list]
    if doomed:
        FileSystems.delete(doomed)
    return doomed


def write_text(path: str, text: str, mime_type: str = "text/plain") -> None:
    """Write text through FileSystems; visible under its final name only when complete."""
    tmp = f"{path}.tmp-{int(time.time() * 1e6)}"
    with FileSystems.create(tmp, mime_type=mime_type) as fh:
        fh.write(text.encode("utf-8"))
    FileSystems.rename([tmp], [path])


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write JSON through FileSystems; visible under its final name only when complete."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str)
    write_text(path, text, mime_type="application/json")


class WriteManifestFn(beam.DoFn):
    """Runs once, after every sink finalised (their file lists are side inputs): writes the
    dataset card, then the manifest. ``webdataset``: (shard file, samples) of each tar
    shard (empty when ``write.formats`` has no webdataset)."""

    def __init__(self, output: str, static: dict[str, Any], started: float, fingerprint_fn) -> None:
        self.output = output
        self.static = static
        self.started = started
        self.fingerprint_fn = fingerprint_fn

    def process(
        self, _unused, counts, curated_files, rejected_files, error_files, runtime, webdataset=()
    ) -> Iterator[str]:
        finished = time.time()
        shards = sorted((relative(f, self.output), n) for f, n in webdataset)
        manifest = {
            "status": "complete",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
            "wall_time_s": round(finished - self.started, 3),
            "counts": counts,
            "outputs": {
                CURATED: sorted(relative(f, self.output) for f in curated_files),
                REJECTED: sorted(relative(f, self.output) for f in rejected_files),
                ERRORS: sorted(relative(f, self.output) for f in error_files),
                "card": CARD,
            },
            **self.static,
            **runtime,
        }
        if shards:
            manifest["outputs"][WEBDATASET] = {
                "shards": [name for name, _ in shards],
                "samples": {name: n for name, n in shards},
                "total_samples": sum(n for _, n in shards),
            }
        if self.fingerprint_fn is not None:
            manifest["models"] = self.fingerprint_fn(manifest.get("models", {}))
        card = dataset_card(manifest)
        write_text(posixpath.join(self.output, CARD), card, mime_type="text/markdown")
        path = posixpath.join(self.output, MANIFEST)
        write_json(path, manifest)
        yield path


def relative(path: str, base: str) -> str:
    base = base.rstrip("/") + "/"
    return path[len(base) :] if path.startswith(base) else path
