"""``capgap synth``: write the synthetic world's splits as sharded Parquet.

Splits (see DESIGN.md): ``seed`` (dense captions, clean), ``web`` (terse
captions, some mismatched), ``test`` (dense captions + labels). Each row is
generated from its own random stream keyed by (seed, split, index), so the
content of a row never depends on the shard count or on the other rows.

    capgap synth --out data/synth                 # all splits from configs/synth.yaml
    capgap synth --split web --n 10000 --shards 8
    capgap synth --processes 2                    # shards side by side, the same bytes
    capgap synth --split web --set splits.web.k=2 # every caption names 2 attributes
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from capgap.core import world
from capgap.core.config import (
    parse_command,
    save_resolved,
)
from capgap.pipeline.jobs import JobPool, run_side_by_side

A = len(world.ATTRIBUTE_NAMES)


@dataclass
class SplitConfig:
    n: int = 1000
    # P(k = 0..A): how many attributes a caption names; ignored when ``k`` is set.
    k_weights: list[float] = field(default_factory=lambda: [0.0] * A + [1.0])
    k: int | None = None
    mismatch_rate: float = 0.0
    # A second caption of the same item in ``caption_terse``, naming k attributes drawn from
    # these weights, never mismatched: the web-style view of a test split's images.
    terse_k_weights: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.k_weights) != A + 1:
            raise ValueError(f"k_weights needs {A + 1} entries (k = 0..{A})")
        if self.terse_k_weights is not None and (
            len(self.terse_k_weights) != A + 1
            or any(w < 0 for w in self.terse_k_weights)
            or sum(self.terse_k_weights) <= 0
        ):
            raise ValueError(f"terse_k_weights needs {A + 1} non-negative entries, sum > 0")
        if any(w < 0 for w in self.k_weights) or sum(self.k_weights) <= 0:
            raise ValueError("k_weights must be non-negative with a positive sum")
        if self.k is not None and not 0 <= self.k <= A:
            raise ValueError(f"k must be in 0..{A}")
        if not 0.0 <= self.mismatch_rate <= 1.0:
            raise ValueError("mismatch_rate must be in [0, 1]")


def _default_splits() -> dict[str, SplitConfig]:
    return {
        "seed": SplitConfig(n=4000),
        "web": SplitConfig(n=6000, k_weights=[0.2, 0.3, 0.25, 0.15, 0.1, 0.0], mismatch_rate=0.1),
        "test": SplitConfig(n=1000, terse_k_weights=[0.2, 0.3, 0.25, 0.15, 0.1, 0.0]),
    }


@dataclass
class SynthConfig:
    out: str = field(default="data/synth", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "world seed"})
    split: str = field(default="all", metadata={"help": "split to write, or 'all'"})
    n: int | None = field(default=None, metadata={"help": "rows per written split"})
    shards: int = field(default=4, metadata={"help": "Parquet shards per split"})
    image_size: int = field(default=32, metadata={"help": "image side in pixels (>= 32)"})
    noise_std: float = field(default=0.05, metadata={"help": "Gaussian pixel noise"})
    processes: int = field(default=1, metadata={"help": "shards written side by side"})
    splits: dict[str, SplitConfig] = field(default_factory=_default_splits)

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError("image_size must be at least 32")
        if self.shards < 1:
            raise ValueError("shards must be >= 1")
        if self.processes < 1:
            raise ValueError("processes must be >= 1")
        if self.split != "all" and self.split not in self.splits:
            raise ValueError(f"split {self.split!r} is not one of {sorted(self.splits)}")


SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        *[pa.field(name, pa.string(), nullable=False) for name in world.LABEL_COLUMNS],
        pa.field("k", pa.int8(), nullable=False),
        pa.field("named_attributes", pa.list_(pa.string()), nullable=False),
        pa.field("mismatched", pa.bool_(), nullable=False),
    ]
)


TERSE_COLUMN = "caption_terse"


def split_schema(split: SplitConfig) -> pa.Schema:
    """:data:`SCHEMA`, plus ``caption_terse`` when the split writes that view."""
    if split.terse_k_weights is None:
        return SCHEMA
    return SCHEMA.append(pa.field(TERSE_COLUMN, pa.string(), nullable=False))


def _split_id(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def make_row(
    index: int, split_name: str, split: SplitConfig, seed: int, image_size: int, noise_std: float
) -> dict:
    """Generate row ``index`` of a split; depends only on its arguments."""
    rng = np.random.default_rng([seed, _split_id(split_name), index])
    item = world.sample_item(rng)
    k = split.k if split.k is not None else int(rng.choice(A + 1, p=_normalised(split.k_weights)))
    named = sorted(rng.choice(A, size=k, replace=False).tolist())
    named_attributes = [world.ATTRIBUTE_NAMES[i] for i in named]
    mismatched = bool(rng.random() < split.mismatch_rate)
    described = item
    if mismatched:
        # The caption is another item's: a different object, so it never describes this image.
        described = world.sample_item(rng)
        while described.object == item.object:
            described = world.sample_item(rng)
    pixels = world.render(item, rng, image_size=image_size, noise_std=noise_std)
    buffer = io.BytesIO()
    # Pixel noise does not compress, so zlib level 0 gives the same size in half the time.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    row = {
        "uid": f"{split_name}-{index:08d}",
        "image": buffer.getvalue(),
        "caption": world.caption(described, named_attributes),
        **{name: item.label(name) for name in world.LABEL_COLUMNS},
        "k": k,
        "named_attributes": named_attributes,
        "mismatched": mismatched,
    }
    if split.terse_k_weights is not None:
        # A stream of its own, so the split's other columns do not change with the view.
        view = np.random.default_rng([seed, _split_id(split_name), index, 1])
        k_terse = int(view.choice(A + 1, p=_normalised(split.terse_k_weights)))
        named_terse = sorted(view.choice(A, size=k_terse, replace=False).tolist())
        row[TERSE_COLUMN] = world.caption(item, [world.ATTRIBUTE_NAMES[i] for i in named_terse])
    return row


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def shard_ranges(n: int, shards: int) -> Iterator[tuple[int, int]]:
    """Contiguous [start, stop) index ranges, as even as possible."""
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    yield from zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)


def write_shard(cfg: SynthConfig, split_name: str, shard: int, start: int, stop: int) -> Path:
    """Rows ``start .. stop - 1`` of ``split_name`` as one Parquet shard (written atomically)."""
    split = cfg.splits[split_name]
    rows = [
        make_row(index, split_name, split, cfg.seed, cfg.image_size, cfg.noise_std)
        for index in range(start, stop)
    ]
    table = pa.Table.from_pylist(rows, schema=split_schema(split))
    path = Path(cfg.out) / split_name / f"{split_name}-{shard:05d}-of-{cfg.shards:05d}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # a shard is visible only once complete
    return path


def _shard_jobs(cfg: SynthConfig, split_name: str) -> list[tuple[Callable, tuple]]:
    """Clear the split's folder; one ``write_shard`` job per shard."""
    n = cfg.n if cfg.n is not None else cfg.splits[split_name].n
    out_dir = Path(cfg.out) / split_name
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{split_name}-*.parquet"):
        stale.unlink()
    return [
        (write_shard, (cfg, split_name, shard, start, stop))
        for shard, (start, stop) in enumerate(shard_ranges(n, cfg.shards))
    ]


def run(
    cfg: SynthConfig,
    show_progress: bool = True,
    pool: JobPool | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, list[Path]]:
    """Write the configured split(s), or the splits named in ``only``; returns the shard
    paths per split.

    Every row is a function of (world seed, split, index) alone, so shards are independent:
    ``cfg.processes`` of them are written side by side, to the same bytes as one at a time
    (on ``pool``'s workers when given, as many as it has), and splits written by separate
    calls are the same as those of one call.
    """
    names = list(cfg.splits) if cfg.split == "all" else [cfg.split]
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"no split {unknown} in {names}")
        names = [name for name in names if name in only]
    jobs = [(name, job) for name in names for job in _shard_jobs(cfg, name)]
    bar = tqdm(total=len(jobs), desc="synth", unit="shard", disable=not show_progress)
    paths = run_side_by_side(
        [job for _, job in jobs], cfg.processes, on_done=lambda _: bar.update(1), pool=pool
    )
    bar.close()
    written: dict[str, list[Path]] = {name: [] for name in names}
    for (name, _), path in zip(jobs, paths, strict=True):
        written[name].append(path)
    save_resolved(cfg, cfg.out, "synth_config.yaml")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_command(argv, "capgap synth", __doc__, SynthConfig)
    written = run(cfg)
    for name, paths in written.items():
        rows = sum(pq.read_metadata(p).num_rows for p in paths)
        print(f"{name}: {rows} rows in {len(paths)} shards under {Path(cfg.out) / name}")
    return 0
