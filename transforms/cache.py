"""Content-addressed cache of per-record model work: CLIP embeddings, dense captions, gate scores.

``capgap curate --cache PREFIX`` keys every unit of model work by what determines it and
reuses it across builds (any Beam filesystem)::

    PREFIX/embeddings/<space>/<build_id>/part-*.parquet   key, image_embedding, text_embedding,
                                                          logit_scale
    PREFIX/captions/<space>/<build_id>/part-*.parquet     key, text, source
    PREFIX/gate/<space>/<build_id>/part-*.parquet         key, new, original
    PREFIX/commits/<build_id>.json                        written last: lists those part files

A *space* is a hash of the settings every entry in it shares (model fingerprint,
preprocessing, generation settings; :class:`Space`); the key inside it hashes the record's
content (sha256 of the image bytes, of the normalised caption, ...), see :func:`embed_key`,
:func:`caption_key`, :func:`gate_key`. A build reads only the part files named by commit
records (:func:`read_commits`): files a killed build left behind are never read (Beam's sink
writes to a temp folder and renames; the commit record is written after every rename).

A lookup is a keyed join (:class:`LookUp`): the rows, keyed by their cache key, and the
space's committed entries, read from their Parquet shards, meet in a ``CoGroupByKey``; each
worker holds one key's group at a time, so the cache never has to fit in one worker's memory.
Hits and misses are counted as Beam counters ``capgap/cache.<stage>.hit|miss``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from capgap.models.captioner import fingerprint_dir
from capgap.models.clip_handler import (
    PRECOMPUTED,
    ClipModelConfig,
    model_fingerprint,
    precomputed,
)
from capgap.transforms.decode import decode_image
from capgap.transforms.embed import CACHED, NEW, EmbedPairs
from capgap.transforms.schema import ERRORS

LOG = logging.getLogger("capgap.cache")

EMBEDDINGS, CAPTIONS, GATE = "embeddings", "captions", "gate"
KINDS: tuple[str, ...] = (EMBEDDINGS, CAPTIONS, GATE)
COMMITS = "commits"
COUNTER_NAMESPACE = "capgap"  # printed by `capgap curate` with the outcome counters
HIT, MISS = "hit", "miss"

SCHEMAS: dict[str, pa.Schema] = {
    EMBEDDINGS: pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("image_embedding", pa.list_(pa.float32()), nullable=False),
            pa.field("text_embedding", pa.list_(pa.float32()), nullable=False),
            pa.field("logit_scale", pa.float64(), nullable=False),
        ]
    ),
    CAPTIONS: pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("source", pa.string(), nullable=False),
        ]
    ),
    GATE: pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("new", pa.float64(), nullable=False),
            pa.field("original", pa.float64(), nullable=False),
        ]
    ),
}


def sha256(data: bytes | str) -> str:
    """Hex sha256 of bytes (a str is UTF-8 encoded first)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def _join(*parts: str) -> str:
    return sha256("\0".join(parts))


def new_build_id() -> str:
    """A sortable, unique build id: UTC time and 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Space:
    """One kind of entries made under one set of settings (model fingerprint, preprocessing,
    generation settings). ``settings`` is JSON; its hash names the folder."""

    kind: str
    settings: dict[str, Any] = field(hash=False)

    @property
    def fingerprint(self) -> str:
        return sha256(json.dumps(self.settings, sort_keys=True, default=str))[:16]

    def folder(self, prefix: str) -> str:
        return posixpath.join(prefix, self.kind, self.fingerprint)


# --- keys ------------------------------------------------------------------------------------


def embed_key(row: dict[str, Any], space: str) -> str:
    """(sha256 of the stored image bytes, sha256 of the normalised caption, space)."""
    return _join(sha256(row["image"]), sha256(row["caption"]), space)


def caption_key(row: dict[str, Any], space: str, uses_caption: bool) -> str:
    """(sha256 of the image bytes, space); plus the original caption when the captioner's
    prompt quotes it (``{caption}``)."""
    parts = [sha256(row["image"]), space]
    if uses_caption:
        parts.append(sha256(row.get("caption") or ""))
    return _join(*parts)


def gate_key(row: dict[str, Any], new_caption: str, space: str) -> str:
    """(sha256 of the image bytes, of the new caption, of the original caption, space)."""
    return _join(
        sha256(row["image"]), sha256(new_caption or ""), sha256(row.get("caption") or ""), space
    )


# --- commit records --------------------------------------------------------------------------


def commit_folder(prefix: str) -> str:
    return posixpath.join(prefix, COMMITS)


def read_commits(prefix: str) -> list[dict[str, Any]]:
    """Every commit record under ``prefix``, oldest first (an unreadable one is skipped with a
    warning: it was never completely written, or someone edited it)."""
    pattern = posixpath.join(commit_folder(prefix), "*.json")
    # No folder yet (an empty cache) matches nothing; an error reading the cache (permissions,
    # credentials) must fail the build, not make it silently recompute everything.
    matches = FileSystems.match([pattern])[0].metadata_list
    records = []
    for meta in sorted(matches, key=lambda m: m.path):
        try:
            with FileSystems.open(meta.path) as fh:
                record = json.loads(fh.read().decode("utf-8"))
            record["_path"] = meta.path
            records.append(record)
        except Exception as err:
            LOG.warning("skipping unreadable cache commit %s: %s", meta.path, err)
    return sorted(records, key=lambda r: (r.get("finished_at", ""), r.get("build_id", "")))


def committed_files(commits: list[dict[str, Any]], space: Space, prefix: str) -> list[str]:
    """The part files of ``space`` that commit records name (paths under ``prefix``)."""
    files: list[str] = []
    for record in commits:
        entry = record.get("spaces", {}).get(f"{space.kind}/{space.fingerprint}")
        if entry:
            files += [posixpath.join(prefix, rel) for rel in entry.get("files", [])]
    return sorted(set(files))


def relative(path: str, base: str) -> str:
    base = base.rstrip("/") + "/"
    return path[len(base) :] if path.startswith(base) else path


# --- the join --------------------------------------------------------------------------------


def _entries_of(kind: str) -> Callable[[pa.Table], Iterator[tuple[str, Any]]]:
    """A function: one Parquet table of ``kind`` entries -> (key, value) pairs."""

    def embeddings(table: pa.Table) -> Iterator[tuple[str, Any]]:
        n = table.num_rows
        if n == 0:
            return
        keys = table.column("key").to_pylist()
        img = table.column("image_embedding").combine_chunks()
        txt = table.column("text_embedding").combine_chunks()
        images = np.asarray(img.flatten(), dtype=np.float32).reshape(n, -1)
        texts = np.asarray(txt.flatten(), dtype=np.float32).reshape(n, -1)
        scales = table.column("logit_scale").to_pylist()
        for i in range(n):
            yield keys[i], (images[i].copy(), texts[i].copy(), float(scales[i]))

    def plain(columns: tuple[str, ...]):
        def rows(table: pa.Table) -> Iterator[tuple[str, Any]]:
            for row in table.to_pylist():
                yield row["key"], tuple(row[c] for c in columns)

        return rows

    return {
        EMBEDDINGS: embeddings,
        CAPTIONS: plain(("text", "source")),
        GATE: plain(("new", "original")),
    }[kind]


def _order(kind: str, value: Any) -> Any:
    """A total order on the values of one key (two builds may have written it): the smallest
    is used, so every build that sees the same entries uses the same one."""
    if kind == EMBEDDINGS:
        return (value[0].tobytes(), value[1].tobytes(), value[2])
    return value


class _SplitFn(beam.DoFn):
    """(key, {items, entries}) -> hit (key, item, value) per item, or miss (key, item);
    ``one_stream``: every item as (key, item, value or None) on the main output."""

    def __init__(self, kind: str, stage: str, one_stream: bool = False) -> None:
        self.kind, self.stage, self.one_stream = kind, stage, one_stream

    def setup(self) -> None:
        self.hits = Metrics.counter(COUNTER_NAMESPACE, f"cache.{self.stage}.{HIT}")
        self.misses = Metrics.counter(COUNTER_NAMESPACE, f"cache.{self.stage}.{MISS}")

    def process(self, element) -> Iterator[Any]:
        key, grouped = element
        entries = list(grouped["entries"])
        value = min(entries, key=lambda v: _order(self.kind, v)) if entries else None
        for item in grouped["items"]:
            if value is None:
                self.misses.inc()
                if self.one_stream:
                    yield key, item, None
                else:
                    yield beam.pvalue.TaggedOutput(MISS, (key, item))
            else:
                self.hits.inc()
                yield key, item, value


class LookUp(beam.PTransform):
    """(key, item) -> tagged ``hit`` (key, item, value) and ``miss`` (key, item), by a
    ``CoGroupByKey`` with the entries in ``files`` (Parquet shards of ``kind``);
    ``one_stream``: one PCollection of (key, item, value or None) instead."""

    def __init__(self, files: list[str], kind: str, stage: str, one_stream: bool = False) -> None:
        super().__init__()
        self.files, self.kind, self.stage = list(files), kind, stage
        self.one_stream = one_stream

    def expand(self, keyed):
        p = keyed.pipeline
        if self.files:
            entries = (
                p
                | "Files" >> beam.Create(self.files)
                | "ReadEntries" >> beam.io.ReadAllFromParquetBatched()
                | "Entries" >> beam.FlatMap(_entries_of(self.kind))
            )
        else:
            entries = p | "NoEntries" >> beam.Create([])
        return (
            {"items": keyed, "entries": entries}
            | "Join" >> beam.CoGroupByKey()
            | "Split"
            >> beam.ParDo(_SplitFn(self.kind, self.stage, self.one_stream)).with_outputs(
                MISS, main=HIT
            )
        )


# --- spaces: what each kind of entry depends on besides the record ----------------------------


def _device_type(device: str | None) -> str:
    return (device or "cpu").split(":", 1)[0]


def _weights(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ``model_fingerprint`` that name the weights (not where they live)."""
    return {k: fingerprint.get(k) for k in ("architecture", "pretrained", "sha256")}


def embed_space(model: Any, decode: Any) -> Space:
    """CLIP embeddings: the model's weights, the device type, AMP and bf16 weights (they move
    the floats), and the decode settings that shape the pixels the model sees."""
    device = _device_type(model.device)
    amp = model.autocast_dtype(device)
    settings = {
        "format": 1,
        "model": _weights(model_fingerprint(model)),
        "device": device,
        "amp": amp is not None,
        "amp_dtype": amp,
        "decode": {
            "model_max_side": decode.model_max_side,
            "alpha_background": list(decode.alpha_background),
            "jpeg_draft": decode.jpeg_draft,  # reduced-scale JPEG decode moves pixels
            # 2: the model's copy has its long side truncated (torchvision's sizing), not
            # rounded (1, until 2026-12-05): a pixel column more or less moves the floats.
            "model_copy_sizing": 2,
        },
    }
    weights_dtype = model.weights_dtype(device)
    if weights_dtype:  # only when set, so float32 spaces keep their fingerprints
        settings["weights_dtype"] = weights_dtype
    return Space(EMBEDDINGS, settings)


# CaptionerConfig fields that do not change what the captioner writes.
_NOT_GENERATION = frozenset({"batch_size", "torch_threads", "local_files_only", "device", "model"})


def captioner_space(captioner: Any) -> Space:
    """Dense captions: the captioner's weights (content hash of a local folder, else hub id
    and revision) and its generation settings."""
    if os.path.isdir(captioner.model):
        weights = {"fingerprint": fingerprint_dir(captioner.model)}
    else:
        weights = {"hub_id": captioner.model, "revision": captioner.revision}
    generation = {
        f.name: getattr(captioner, f.name)
        for f in dataclasses.fields(captioner)
        if f.name not in _NOT_GENERATION
    }
    generation["device"] = _device_type(captioner.device)
    return Space(CAPTIONS, {"format": 1, "captioner": weights, "generation": generation})


def gate_space(clip: ClipModelConfig) -> Space:
    """Gate scores: the gate CLIP run's weights, the device type, and AMP and bf16 weights
    when on (they move the floats; float32 spaces keep their fingerprints)."""
    device = _device_type(clip.device)
    settings: dict[str, Any] = {
        "format": 1,
        "model": _weights(model_fingerprint(ClipModelConfig(run_dir=clip.run_dir))),
        "device": device,
    }
    amp = clip.autocast_dtype(device)
    if amp:
        settings["amp_dtype"] = amp
    weights_dtype = clip.weights_dtype(device)
    if weights_dtype:
        settings["weights_dtype"] = weights_dtype
    return Space(GATE, settings)


# --- the cached embedding stage ----------------------------------------------------------------


def _lossy_stored(row: dict) -> bool:
    """Whether ``image`` holds a lossy re-encode (an EXIF-rotated JPEG, a lossy WebP, ...),
    whose decode is not the pixels the model saw."""
    notes = (row.get("decode_notes") or "").split(",")
    return "reencoded_jpeg" in notes or "reencoded_webp" in notes


def _keyed_pair(element: tuple[str, dict], space: str) -> tuple[str, tuple[str, dict]]:
    """(uid, pair) -> (key, (uid, pair)): pixels are not shuffled, except for the rows whose
    stored bytes are a lossy re-encode (a miss could not get the same pixels back)."""
    uid, pair = element
    keep = _lossy_stored(pair)
    row = {k: v for k, v in pair.items() if keep or k != "pixels"}
    return embed_key(row, space), (uid, row)


def _hit_or_redecode(element: tuple, decode: Any) -> tuple[str, dict]:
    """A hit carries the cache's embeddings (``PRECOMPUTED``) through the embedding step; a
    miss gets its pixels back from its stored image bytes (the same pixels: the bytes are
    the original ones or a lossless PNG of the normalised image, EXIF already applied; a
    lossy re-encode kept its pixels through the join)."""
    _, (uid, row), value = element
    if value is not None:
        out = {k: v for k, v in row.items() if k != "pixels"}
        out[PRECOMPUTED] = {**precomputed(*value), CACHED: True}
        return uid, out
    if "pixels" in row:
        return uid, row
    return uid, {**row, "pixels": decode_image(row["image"], decode).pixels}


def _is_hit(element: tuple) -> bool:
    return element[2] is not None


def _is_miss(element: tuple) -> bool:
    return element[2] is None


def _embedding_entry(element: tuple[str, dict], space: str) -> dict[str, Any]:
    _, row = element
    return {
        "key": embed_key(row, space),
        "image_embedding": row["image_embedding"],
        "text_embedding": row["text_embedding"],
        "logit_scale": row["logit_scale"],
    }


class CachedEmbed(beam.PTransform):
    """:class:`~capgap.transforms.embed.EmbedPairs` that takes embeddings from the cache where
    it has them: (uid, pair) -> {"ok", "errors"} as EmbedPairs returns, and after expansion
    ``cache_outputs``: the new entries (unless ``write`` is off) and the hit / miss
    PCollections of ``stage``. Hits and misses go through one embedding step, the hits
    carrying the cache's embeddings past the model (``PRECOMPUTED``, marked ``CACHED``);
    entries are written for the rest (its ``new`` output). ``embed``: that step, an
    ``EmbedPairs(..., new_rows=True)`` or a transform around one (an
    :class:`~capgap.transforms.bank.EmbedOutsideBank` takes the bank's rows from the bank);
    default ``EmbedPairs(model, new_rows=True)``."""

    def __init__(
        self,
        model: Any,
        decode: Any,
        space: Space,
        files: list[str],
        stage: str = "embed",
        write: bool = True,
        embed: beam.PTransform | None = None,
    ) -> None:
        super().__init__()
        self.model, self.decode, self.space, self.files = model, decode, space, files
        self.stage, self.write = stage, write
        self.embed = embed
        self.cache_outputs: dict[str, Any] = {}

    def expand(self, pairs):
        fp = self.space.fingerprint
        # One stream: hits carry the cache's embeddings through the same RunInference step
        # as the misses (no Flatten of two streams, which DirectRunner materialises).
        looked = (
            pairs
            | "Key" >> beam.Map(_keyed_pair, fp)
            | "LookUp" >> LookUp(self.files, EMBEDDINGS, self.stage, one_stream=True)
        )
        looked = looked[HIT]  # the main output: with one_stream, every item, hit or not
        marked = looked | "HitOrRedecode" >> beam.Map(_hit_or_redecode, self.decode)
        embedded = marked | "Embed" >> (self.embed or EmbedPairs(self.model, new_rows=True))
        entries = {}
        if self.write:
            entries["embed"] = embedded[NEW] | "Entries" >> beam.Map(_embedding_entry, fp)
        self.cache_outputs = {
            "entries": entries,
            "stages": {
                f"{self.stage}.{HIT}": looked | "Hits" >> beam.Filter(_is_hit),
                f"{self.stage}.{MISS}": looked | "Misses" >> beam.Filter(_is_miss),
            },
        }
        return {"ok": embedded["ok"], ERRORS: embedded[ERRORS]}
