"""What keeping large malloc blocks for reuse (capgap/core/malloc.py) buys a CPU forward pass.

The setting is process-wide and cannot be taken back cleanly, so each arm runs in a child
process of its own: ``default`` (glibc as it comes, ``CAPGAP_MALLOC=default``) and ``kept``
(:func:`keep_large_blocks`, what the ``capgap`` command does), alternating for ``--rounds``
rounds. A child builds the model through capgap's :class:`ClipEmbedder` (open_clip
ViT-B-32 at 224 px by default, random weights; ``--hf_model DIR`` for a transformers
checkpoint), embeds one warm-up batch, then times ``--reps`` batches of ``--batch`` random
images with short captions and reports its best and median ms a pair, its minor page
faults a batch and its peak RSS. Printed: each arm's medians over rounds and the ratio
default / kept (> 1: the kept blocks are faster).

    python benchmarks/malloc_reuse.py                        # ViT-B-32, batch 64, 2 threads
    python benchmarks/malloc_reuse.py --batch 16 --rounds 3
    python benchmarks/malloc_reuse.py --name capgap-micro-vit --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CAPTIONS = ["a red car parked on a street", "two dogs on the grass", "a bowl of soup"]


def child(args: argparse.Namespace) -> dict:
    from capgap.core.malloc import keep_large_blocks

    kept = keep_large_blocks()
    import numpy as np

    from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig

    embedder = ClipEmbedder(
        ClipModelConfig(
            name=args.name, hf_model=args.hf_model, torch_threads=args.threads,
            cpu_bf16=args.cpu_bf16,
        )
    )  # fmt: skip
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(args.batch)]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    embedder.embed(pixels, captions)  # warm-up
    times, faults = [], []
    for _ in range(args.reps):
        flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        embedder.embed(pixels, captions)
        times.append((time.perf_counter() - start) * 1000 / args.batch)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt)
    return {
        "kept": kept,
        "best_ms": min(times),
        "median_ms": statistics.median(times),
        "faults_per_batch": statistics.median(faults),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="ViT-B-32", help="open_clip / capgap architecture")
    ap.add_argument("--hf_model", default=None, help="a transformers CLIP folder instead")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4, help="timed batches a child")
    ap.add_argument("--rounds", type=int, default=3, help="default/kept child pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cpu_bf16", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}

    own = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--child"]
    arms: dict[str, list[dict]] = {"default": [], "kept": []}
    for rnd in range(args.rounds):
        # Alternate which arm goes first, so a drift of the VM's speed falls on both.
        order = ("default", "kept") if rnd % 2 == 0 else ("kept", "default")
        for arm in order:
            env = dict(os.environ)
            env.pop("CAPGAP_MALLOC", None)
            if arm == "default":
                env["CAPGAP_MALLOC"] = "default"
            out = subprocess.run(
                [sys.executable, __file__, *own, "--child"],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if result["kept"] != (arm == "kept"):
                raise SystemExit(f"arm {arm}: keep_large_blocks returned {result['kept']}")
            arms[arm].append(result)
            print(
                f"round {rnd + 1} {arm:7s}: median {result['median_ms']:.1f} ms a pair (best "
                f"{result['best_ms']:.1f}), {result['faults_per_batch']:.0f} page faults a "
                f"batch, peak RSS {result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    summary = {
        arm: {
            key: statistics.median(r[key] for r in results)
            for key in ("median_ms", "best_ms", "faults_per_batch", "peak_rss_mib")
        }
        for arm, results in arms.items()
    }
    pairs = zip(arms["default"], arms["kept"], strict=True)
    ratios = [d["median_ms"] / k["median_ms"] for d, k in pairs]
    summary["speedup_per_round"] = [round(r, 3) for r in ratios]
    summary["speedup"] = statistics.median(ratios)
    model = args.hf_model or args.name
    print(
        f"\n{model}, batch {args.batch}, {args.threads} threads"
        f"{', bf16' if args.cpu_bf16 else ''}: default {summary['default']['median_ms']:.1f} "
        f"ms a pair, kept {summary['kept']['median_ms']:.1f}: {summary['speedup']:.2f}x "
        f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}); page faults a batch "
        f"{summary['default']['faults_per_batch']:.0f} -> {summary['kept']['faults_per_batch']:.0f}"
        f"; peak RSS {summary['default']['peak_rss_mib']:.0f} -> "
        f"{summary['kept']['peak_rss_mib']:.0f} MiB"
    )
    return summary


if __name__ == "__main__":
    main()
