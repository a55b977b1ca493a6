"""Benchmark ``capgap synth``: pairs/s on one core, and determinism across shard counts.

    .venv/bin/python benchmarks/synth_throughput.py [--n 10000]

Pins itself to one CPU core, generates the ``web`` split twice (4 and 3 shards),
prints the rate against the 2,000 pairs/s target and against a baseline that only
renders pixels (no captions, PNG or Parquet) in the same process, and checks
that both runs hold identical rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from capgap.core import world
from capgap.pipeline import synth

TARGET_PAIRS_PER_S = 2000.0


def _rows(out: str) -> list[dict]:
    table = pq.ParquetDataset(os.path.join(out, "web")).read()
    return sorted(table.to_pylist(), key=lambda row: row["uid"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    start = time.perf_counter()
    for index in range(args.n):
        rng = np.random.default_rng([0, index])
        world.render(world.sample_item(rng), rng)
    render_rate = args.n / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        rates = []
        for shards in (4, 3):
            cfg = synth.SynthConfig(out=os.path.join(tmp, f"s{shards}"), split="web", n=args.n)
            cfg.shards = shards
            start = time.perf_counter()
            synth.run(cfg, show_progress=False)
            rates.append(args.n / (time.perf_counter() - start))
        identical = _rows(os.path.join(tmp, "s4")) == _rows(os.path.join(tmp, "s3"))

    rate = max(rates)
    print(
        f"synth web n={args.n} on 1 core: {rate:,.0f} pairs/s (runs: {rates[0]:,.0f}, {rates[1]:,.0f})"
    )
    print(f"ratio vs target {TARGET_PAIRS_PER_S:,.0f} pairs/s: {rate / TARGET_PAIRS_PER_S:.2f}")
    print(f"ratio vs render-only baseline ({render_rate:,.0f} pairs/s): {rate / render_rate:.2f}")
    print(f"identical rows with 4 and 3 shards: {identical}")
    if not identical:
        raise SystemExit("determinism check failed")


if __name__ == "__main__":
    main()
