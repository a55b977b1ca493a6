"""Streaming image-caption pairs from Parquet shards, for training.

``ParquetPairs`` is a torch ``IterableDataset``: the shards' row groups (large ones
cut into slices) are the units of work; each epoch shuffles the unit order with a
seed, deals the units round-robin to DataLoader workers (every row read exactly
once per epoch, no duplicates), and each worker shuffles rows through a seeded
buffer. Images are encoded bytes (JPEG, PNG, WebP), in a binary column or in Hugging
Face's ``Image()`` struct ``{bytes, path}`` as ``capgap curate`` writes them; column names are configurable. When a second
caption column exists (``original_caption`` after recaptioning), each row uses the
dense caption with probability ``dense_prob`` (0.8, as Recap-DataComp-1B) and the
original otherwise. A row that fails to decode raises with its uid: training data
is already curated, so a bad row is a bug upstream, not something to skip.
With ``cache_decoded`` the preprocessed image tensors and the token ids of every
caption are kept in memory after their first use (the transform and tokenizer
are deterministic, so later epochs get the same values without decoding or
tokenising again); for data that fits in RAM, read in the training process
(``num_workers=0``: worker processes are rebuilt every epoch). Shard patterns expand
with ``capgap.core.files.expand_paths``; images decode with ``capgap.core.images.rgb_image``.

    ds = ParquetPairs(expand_paths("data/synth/seed/*.parquet"), preprocess, tokenizer, seed=0)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=256, num_workers=2, drop_last=True, collate_fn=ds.collate)
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from capgap.core.images import rgb_image

# (shard, row group, row in group), uid, image cell (bytes or an HF {bytes, path}), caption
Row = tuple[tuple[str, int, int], str, bytes | dict | None, str | None]


@dataclass(frozen=True)
class Unit:
    """A slice [start, stop) of one row group of one shard."""

    path: str
    row_group: int
    start: int
    stop: int


def plan_units(files: Sequence[str | os.PathLike], rows_per_unit: int = 2048) -> list[Unit]:
    """Cut every row group into slices of at most ``rows_per_unit`` rows."""
    units = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for start in range(0, n, rows_per_unit):
                units.append(Unit(str(path), rg, start, min(start + rows_per_unit, n)))
    return units


class ParquetPairs(IterableDataset):
    """(image tensor, caption) pairs streamed from Parquet; ``collate`` tokenises per batch."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        image_column: str = "image",
        caption_column: str = "caption",
        original_caption_column: str | None = "original_caption",
        dense_prob: float = 0.8,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        rows_per_unit: int = 2048,
        uid_column: str = "uid",
        cache_decoded: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= dense_prob <= 1.0:
            raise ValueError("dense_prob must be in [0, 1]")
        if not files:
            raise ValueError("no Parquet files given")
        self.files = [str(f) for f in files]
        self.transform, self.tokenizer = transform, tokenizer
        self.image_column, self.caption_column = image_column, caption_column
        self.original_caption_column = original_caption_column
        self.dense_prob = dense_prob
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, max(1, shuffle_buffer), seed
        self.uid_column = uid_column
        self.cache_decoded = cache_decoded
        # (shard, row group, row) -> preprocessed image; filled on first use
        self._image_cache: dict[tuple[str, int, int], torch.Tensor] = {}
        self._token_cache: dict[str, torch.Tensor] = {}  # caption -> token ids
        self.units = plan_units(self.files, rows_per_unit)
        self.num_rows = sum(u.stop - u.start for u in self.units)
        self.epoch = 0
        self._check_columns()

    def _check_columns(self) -> None:
        for path in self.files:
            names = set(pq.ParquetFile(path).schema_arrow.names)
            missing = {self.image_column, self.caption_column, self.uid_column} - names
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}")

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (call before iterating; workers copy the dataset per epoch)."""
        self.epoch = epoch

    def units_for_worker(self, worker_id: int, num_workers: int) -> list[Unit]:
        """This epoch's units for one worker: a seeded shuffle, dealt round-robin."""
        order = list(self.units)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order[worker_id::num_workers]

    def rows_per_worker(self, num_workers: int) -> list[int]:
        """Rows each of ``num_workers`` workers yields this epoch (for exact step counts)."""
        workers = max(1, num_workers)
        return [
            sum(u.stop - u.start for u in self.units_for_worker(w, workers)) for w in range(workers)
        ]

    def batches_per_epoch(self, batch_size: int, num_workers: int, drop_last: bool = True) -> int:
        """Batches a DataLoader yields per epoch: every worker batches its own rows."""
        rows = self.rows_per_worker(num_workers)
        if drop_last:
            return sum(r // batch_size for r in rows)
        return sum(-(-r // batch_size) for r in rows)

    def _rows(self, units: list[Unit], rng: random.Random) -> Iterator[Row]:
        """(row key, uid, image bytes, chosen caption) for every row of ``units``, in order."""
        cached_key, table, mix = None, None, False
        for unit in units:
            if cached_key != (unit.path, unit.row_group):
                pf = pq.ParquetFile(unit.path)
                columns = [self.uid_column, self.image_column, self.caption_column]
                mix = self.original_caption_column in pf.schema_arrow.names
                if mix:
                    columns.append(self.original_caption_column)
                table = pf.read_row_group(unit.row_group, columns=columns)
                cached_key = (unit.path, unit.row_group)
            part = table.slice(unit.start, unit.stop - unit.start).to_pydict()
            originals = part.get(self.original_caption_column) if mix else None
            for i, uid in enumerate(part[self.uid_column]):
                caption = part[self.caption_column][i]
                if originals is not None and originals[i] and rng.random() >= self.dense_prob:
                    caption = originals[i]
                key = (unit.path, unit.row_group, unit.start + i)
                yield key, uid, part[self.image_column][i], caption

    def decode(
        self,
        key: tuple[str, int, int] | None,
        uid: str,
        image_bytes: bytes | dict | None,
        caption: str | None,
    ) -> tuple[torch.Tensor, str]:
        """Decoded, preprocessed image and its caption; raises ValueError naming the uid."""
        if image_bytes is None or caption is None:
            raise ValueError(f"row {uid}: image or caption is null")
        cached = self._image_cache.get(key) if self.cache_decoded else None
        if cached is not None:
            return cached, caption
        image = rgb_image(image_bytes, what=f"row {uid}")  # ValueError naming the uid
        try:
            image = self.transform(image)
        except (OSError, ValueError) as err:
            raise ValueError(f"row {uid}: cannot preprocess image: {err}") from err
        if self.cache_decoded and key is not None:
            self._image_cache[key] = image
        return image, caption

    def collate(
        self, batch: Sequence[tuple[torch.Tensor, str]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DataLoader ``collate_fn``: stacked images and the batch's captions tokenised at once.

        One tokenizer call per batch instead of one per row (open_clip pads and packs in a
        single pass), run in the worker like the decoding.
        """
        images, captions = zip(*batch, strict=True)
        if not self.cache_decoded:
            return torch.stack(images), self.tokenizer(list(captions))
        new = list(dict.fromkeys(c for c in captions if c not in self._token_cache))
        if new:
            self._token_cache.update(zip(new, self.tokenizer(new), strict=True))
        return torch.stack(images), torch.stack([self._token_cache[c] for c in captions])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(f"{self.seed}-{self.epoch}-{worker_id}")
        rows = self._rows(self.units_for_worker(worker_id, num_workers), rng)
        if not self.shuffle:
            for row in rows:
                yield self.decode(*row)
            return
        # Shuffle buffer: fill, then emit a random slot and refill it with the next row.
        buffer: list[Row] = []
        for row in rows:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            slot = rng.randrange(len(buffer))
            out, buffer[slot] = buffer[slot], row
            yield self.decode(*out)
        rng.shuffle(buffer)
        for row in buffer:
            yield self.decode(*row)
