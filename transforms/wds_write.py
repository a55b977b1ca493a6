"""WebDataset tar shards of the curated rows (``write.formats: [parquet, webdataset]``).

:class:`WriteWebDataset` turns curated rows into ``<output>/curated-wds/shard-SSSSS.tar``,
the layout open_clip's and most large-scale loaders read
(``shard-{00000..00041}.tar``). Each sample is three members::

    <key>.jpg | .png | .webp   the stored image bytes; the extension names their format
    <key>.txt                  the caption (UTF-8)
    <key>.json                 uid, original caption, scores, decision, ... and the
                               input's own columns

WebDataset splits a member name at the first dot of its base name, so a uid like
``metadata.csv#3`` cannot be a key as it is: :func:`sample_key` %-escapes every character
but letters, digits, ``-`` and ``_`` (``metadata%2Ecsv%233``), which keeps keys unique
and readable; the real uid is in the ``.json``.

The shard count is ``num_shards`` or, when 0, the curated row count over
``samples_per_shard``; a row's shard is a stable hash of its uid, rows within a shard
are in key order, and every shard index gets a file (empty if no uid hashed to it), so
the names form an unbroken brace range. Built from Beam's GroupByKey and
``FileSystems`` only, so it runs on every runner and filesystem. Returns
``(shard path, samples)`` per shard, for the manifest.

    rows | WriteWebDataset("out/web", samples_per_shard=10_000)
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from capgap.transforms.schema import WEBDATASET
from capgap.transforms.write import shard_of

#: Member extension of each stored image format (``image_format``).
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SHARD_TEMPLATE = "shard-{:05d}.tar"
_NOT_IN_JSON = frozenset({"image", "caption", "columns", "pixels"})


def sample_key(uid: str) -> str:
    """A WebDataset key for ``uid``: no dot or slash, unique (an injective escape; the empty
    uid is ``%``, which no escape of another uid can be)."""
    return quote(uid, safe="-_").replace(".", "%2E").replace("~", "%7E") or "%"


def sample_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one curated row's sample."""
    key = sample_key(row["uid"])
    ext = IMAGE_EXTENSIONS.get(row["image_format"])
    if ext is None:
        raise ValueError(f"row {row['uid']}: no WebDataset extension for {row['image_format']}")
    meta = {k: v for k, v in row.items() if k not in _NOT_IN_JSON}
    meta.update({k: v for k, v in (row.get("columns") or {}).items() if k not in meta})
    text = json.dumps(meta, ensure_ascii=False, default=str)
    return [
        (f"{key}.{ext}", row["image"]),
        (f"{key}.txt", row["caption"].encode("utf-8")),
        (f"{key}.json", text.encode("utf-8")),
    ]


def write_tar(path: str, samples: Iterable[list[tuple[str, bytes]]]) -> int:
    """Write ``samples`` (each a list of members) as one tar through ``FileSystems``;
    visible under ``path`` only when complete. Returns the number of samples."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    n = 0
    with (
        FileSystems.create(tmp, mime_type="application/x-tar") as fh,
        tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
            n += 1
    FileSystems.rename([tmp], [path])
    return n


class _WriteShardFn(beam.DoFn):
    """(shard index, rows or None markers) -> the shard's tar; yields (path, samples)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def process(self, element: tuple[int, Iterable[Any]]) -> Iterator[tuple[str, int]]:
        index, values = element
        rows = sorted((v for v in values if v is not None), key=lambda r: sample_key(r["uid"]))
        path = posixpath.join(self.folder, SHARD_TEMPLATE.format(index))
        yield path, write_tar(path, (sample_members(r) for r in rows))


def shard_count(rows: int, num_shards: int, samples_per_shard: int) -> int:
    """``num_shards`` when set, else one shard per ``samples_per_shard`` rows (at least one)."""
    return num_shards or max(1, math.ceil(rows / samples_per_shard))


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    """What a sample needs of a row (the model's pixels stay behind)."""
    return {k: v for k, v in row.items() if k != "pixels"}


class WriteWebDataset(beam.PTransform):
    """Curated rows -> ``<output>/curated-wds/shard-SSSSS.tar``; returns (path, samples)."""

    def __init__(self, output: str, num_shards: int = 0, samples_per_shard: int = 10_000) -> None:
        super().__init__()
        if num_shards < 0 or samples_per_shard < 1:
            raise ValueError("webdataset shards: num_shards >= 0, samples_per_shard >= 1")
        self.output, self.num_shards = output, num_shards
        self.samples_per_shard = samples_per_shard

    def expand(self, rows):
        n = (
            rows
            | "Count" >> beam.combiners.Count.Globally()
            | "Shards" >> beam.Map(shard_count, self.num_shards, self.samples_per_shard)
        )
        keyed = rows | "ByUid" >> beam.Map(
            lambda row, k: (shard_of(row["uid"], k), _slim(row)), k=beam.pvalue.AsSingleton(n)
        )
        every = n | "EveryShard" >> beam.FlatMap(lambda k: [(i, None) for i in range(k)])
        folder = posixpath.join(self.output, WEBDATASET)
        return (
            (keyed, every)
            | "Flatten" >> beam.Flatten()
            | "Group" >> beam.GroupByKey()
            | "WriteTar" >> beam.ParDo(_WriteShardFn(folder))
        )
