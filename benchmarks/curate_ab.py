"""Paired A/B of one change to the curate path: the pipeline's steady state with and without
it, each against the bare batched scorer, in one process (``curate_throughput.py``'s loops).

The change measured: DecompressionBombWarning as an error once per worker
(``decode.raise_bomb_warnings``) against ``warnings.catch_warnings`` per image (the old
path, restored by patching ``decode.bomb_warnings_as_errors``). Per rep: bare, A small, A
large, B small, B large, bare (the order of A and B alternates between reps); each
variant's steady rate ((large - small) rows / extra seconds) is paired with the mean of the
two bare runs.

    python benchmarks/curate_ab.py --reps 3 --n 3000 --scale 4
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import curate_throughput as ct  # noqa: E402

from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig  # noqa: E402
from capgap.pipeline import curate  # noqa: E402
from capgap.transforms import decode  # noqa: E402

NEW = decode.bomb_warnings_as_errors


def old_path():
    return decode._bomb_warnings_caught()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="capgap-micro-vit")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.device = "cpu"
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="capgap-ab-") as tmp:
        root = Path(tmp)
        n_big = args.n * args.scale
        big = ct.write_split(root / "big", n_big)
        small = ct.write_split(root / "small", args.n)
        embedder = ClipEmbedder(ClipModelConfig(name=args.model, torch_threads=args.threads))
        bank = ct.reference_bank(embedder, big, curate.CurateConfig().score.bank_size)
        ct.bare_loop(embedder, big, args.batch, bank, limit=args.batch)
        ct.pipeline_seconds(small, root / "warm", args, args.n)
        ratios: dict[str, list[float]] = {"old": [], "new": []}
        rates: dict[str, list[float]] = {"old": [], "new": [], "bare": []}
        after = ct.bare_loop(embedder, big, args.batch, bank)
        for rep in range(args.reps):
            before = after
            order = ("old", "new") if rep % 2 == 0 else ("new", "old")
            steady = {}
            for name in order:
                decode.bomb_warnings_as_errors = old_path if name == "old" else NEW
                s = ct.pipeline_seconds(small, root / f"s{rep}{name}", args, args.n)
                b = ct.pipeline_seconds(big, root / f"b{rep}{name}", args, n_big)
                steady[name] = (n_big - args.n) / (b - s)
            decode.bomb_warnings_as_errors = NEW
            after = ct.bare_loop(embedder, big, args.batch, bank)
            bare = (before + after) / 2
            rates["bare"].append(bare)
            for name in ("old", "new"):
                rates[name].append(steady[name])
                ratios[name].append(steady[name] / bare)
            print(
                f"rep {rep}: bare {bare:.0f} pairs/s; steady old {steady['old']:.0f} "
                f"({steady['old'] / bare:.3f}x), new {steady['new']:.0f} "
                f"({steady['new'] / bare:.3f}x)",
                flush=True,
            )
        report = {
            "model": args.model,
            "rows": n_big,
            "pairs_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "paired_ratios": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
            "paired_median": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        }
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
