"""Curate throughput and memory: the Beam pipeline against bare loops over the same model.

One run, one model, one synthetic ``web`` split written to a temporary folder:

- ``pipeline``: ``capgap curate`` end to end on Beam's DirectRunner (in_memory): read
  Parquet, dedup, decode + validate, RunInference, bank + scores, decide, write
  three Parquet outputs and the manifest. Two numbers: end to end (input rows /
  wall time, Beam's fixed start-up of some 30 stages included) and steady state
  (the marginal rate between a run on ``--n`` rows and one on ``--scale`` times
  as many: extra rows / extra seconds, i.e. what a large build sees). The fixed part
  includes the bank pass, which embeds ``bank_size * bank_oversample`` = 2,560 rows (all
  of them when the input is smaller; the main pass reuses those embeddings);
  ``--n`` must be at least that many, so that both runs embed the same bank and the
  difference holds only per-row work (the index and bank passes' reads included).
- ``batched``: the minimal scorer of the same shards, with the same model object: read
  ``--batch`` rows with pyarrow, decode the PNGs, preprocess, embed, score against a bank
  of 2,048 image embeddings (``batch_scores``, as the pipeline does); no validation,
  dedup, decisions or output, and its bank is free (the first rows). Target: pipeline >=
  0.9x batched in the steady state (issue #20; 0.8x before). The pipeline's RunInference gets
  ``min_batch_size = max_batch_size = --batch``, so both see the same batches.
- ``single``: the same loop one pair at a time. Target: pipeline >= 10x single.
- memory: peak RSS of the pipeline in a fresh process on ``--n`` rows and on
  ``--memory_factor`` times as many. Target: grows < 1.5x.

Runs alternate (batched, pipeline small, pipeline large, batched, single, ...) so that
load from other processes hits each alike; each rep's pipeline rate is paired with the
mean of the bare loop runs just before and after it (this VM's speed drifts by 10-20%
within a minute), and medians are reported. The same ratios are also reported per CPU
second of the process (``time.process_time``, all threads; both loops use ``--threads``
torch threads): the work each does per pair, which moves far less than wall time when
other jobs share the cores. Prints one JSON line at the end.

    python benchmarks/curate_throughput.py                       # micro CLIP, 3,000 + 30,000 rows
    python benchmarks/curate_throughput.py --model capgap-small-vit --n 3000 --reps 2
    python benchmarks/curate_throughput.py --device cuda --model capgap-small-vit  # a GPU
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig
from capgap.pipeline import curate, synth
from capgap.transforms.bank import candidate_count
from capgap.transforms.score import ScoreConfig, batch_scores


def write_split(folder: Path, n: int, shards: int = 4) -> str:
    """n synthetic web rows in ``shards`` Parquet files; returns the glob."""
    folder.mkdir(parents=True, exist_ok=True)
    split = synth.SplitConfig(n=n, k_weights=[0.2, 0.3, 0.25, 0.15, 0.1, 0.0], mismatch_rate=0.1)
    for shard, (lo, hi) in enumerate(synth.shard_ranges(n, shards)):
        rows = [synth.make_row(i, "web", split, 0, 32, 0.05) for i in range(lo, hi)]
        pq.write_table(pa.Table.from_pylist(rows, schema=synth.SCHEMA), folder / f"{shard}.parquet")
    return str(folder / "*.parquet")


def shard_paths(pattern: str) -> list[Path]:
    return sorted(Path(pattern).parent.glob("*.parquet"))


def pixels(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def reference_bank(
    embedder: ClipEmbedder, pattern: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image, caption) embeddings of the first ``size`` rows: the bare loop's bank (the
    pipeline picks its bank by hash, which costs it a pass of its own; the bare loop gets one
    for free)."""
    table = pq.read_table(shard_paths(pattern)[0], columns=["image", "caption"]).slice(0, size)
    images = [pixels(raw) for raw in table["image"].to_pylist()]
    return embedder.embed(images, table["caption"].to_pylist())[:2]


def chunks(pattern: str, batch: int, limit: int | None = None):
    """(image bytes, captions) of ``batch`` rows at a time, read with pyarrow; ``limit`` rows."""
    left = limit
    for path in shard_paths(pattern):
        parquet = pq.ParquetFile(path)
        for chunk in parquet.iter_batches(batch_size=batch, columns=["image", "caption"]):
            raws, captions = chunk.column(0).to_pylist(), chunk.column(1).to_pylist()
            if left is not None:
                raws, captions = raws[:left], captions[:left]
                left -= len(raws)
            yield raws, captions
            if left == 0:
                return


def bare_loop_rates(
    embedder: ClipEmbedder,
    pattern: str,
    batch: int,
    bank: tuple[np.ndarray, np.ndarray],
    limit: int | None = None,
) -> tuple[float, float]:
    """(pairs per wall second, pairs per CPU second) of the minimal scorer of the same shards:
    read ``batch`` rows, decode the PNGs, preprocess + embed, score against ``bank`` (no
    validation, no decisions, no output)."""
    cfg, tau = ScoreConfig(), 1.0 / embedder.logit_scale
    done = 0
    # Reading is part of the loop's work, as it is the pipeline's.
    start, cpu = time.perf_counter(), time.process_time()
    for raws, captions in chunks(pattern, batch, limit):
        img, txt, _ = embedder.embed([pixels(raw) for raw in raws], captions)
        batch_scores(img, txt, bank[0], tau, cfg, bank_texts=bank[1])
        done += len(raws)
    return done / (time.perf_counter() - start), done / (time.process_time() - cpu)


def bare_loop(
    embedder: ClipEmbedder,
    pattern: str,
    batch: int,
    bank: tuple[np.ndarray, np.ndarray],
    limit: int | None = None,
) -> float:
    """Pairs per wall second of :func:`bare_loop_rates`."""
    return bare_loop_rates(embedder, pattern, batch, bank, limit)[0]


def curate_argv(pattern: str, output: Path, args: argparse.Namespace) -> list[str]:
    return [
        "--input",
        pattern,
        "--output",
        str(output),
        "--overwrite",
        "--set",
        f"model.name={args.model}",
        "--set",
        f"model.device={args.device}",
        "--set",
        f"model.max_batch_size={args.batch}",
        "--set",
        f"model.min_batch_size={args.batch}",
        "--set",
        f"model.torch_threads={args.threads or 'null'}",
        "--set",
        f"model.cpu_matmul={args.cpu_matmul}",
        "--direct_running_mode=in_memory",
    ]


def pipeline_times(
    pattern: str, output: Path, args: argparse.Namespace, n: int
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``capgap curate`` end to
    end."""
    start, cpu = time.perf_counter(), time.process_time()
    manifest = curate.run(curate_argv(pattern, output, args))
    elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu
    assert manifest["counts"]["rows_in"] == n, manifest["counts"]
    return elapsed, cpu_elapsed


def pipeline_seconds(pattern: str, output: Path, args: argparse.Namespace, n: int) -> float:
    """Wall seconds of ``capgap curate`` end to end."""
    return pipeline_times(pattern, output, args, n)[0]


def child_memory(pattern: str, output: str, args: argparse.Namespace) -> None:
    """Run the pipeline once in this (fresh) process; print its peak RSS in MiB."""
    curate.run(curate_argv(pattern, Path(output), args))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak_kib / 1024.0}))


def measure_memory(pattern: str, output: Path, args: argparse.Namespace) -> float:
    flags = ["--model", args.model, "--device", args.device, "--batch", str(args.batch)]
    flags += ["--threads", str(args.threads)]
    out = subprocess.run(
        [sys.executable, __file__, "--child_memory", pattern, str(output), *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="capgap-micro-vit")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (both loops, AMP on CUDA)")
    parser.add_argument("--n", type=int, default=3000, help="rows of the small pipeline run")
    parser.add_argument("--single_n", type=int, default=300, help="rows for the 1-pair loop")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=int, default=10, help="second pipeline run: n * scale")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: default")
    parser.add_argument(
        "--cpu_matmul",
        default="auto",
        choices=["auto", "onednn", "torch"],
        help="model.cpu_matmul, both loops (auto: linears through oneDNN on x86-64)",
    )
    parser.add_argument("--memory_factor", type=int, default=10)
    parser.add_argument("--memory_n", type=int, default=500, help="base rows for memory")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--child_memory", nargs=2, metavar=("PATTERN", "OUTPUT"))
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(*args.child_memory, args)
        return 0
    bank_rows = candidate_count(curate.CurateConfig().score)
    if args.n < bank_rows:
        parser.error(f"--n must be >= {bank_rows} (the bank pass's rows) for the steady state")

    with tempfile.TemporaryDirectory(prefix="capgap-curate-bench-") as tmp:
        root = Path(tmp)
        n_big = args.n * args.scale
        big_pattern = write_split(root / "data_big", n_big)
        pattern = write_split(root / "data", args.n)
        model_cfg = ClipModelConfig(
            name=args.model,
            device=args.device,
            torch_threads=args.threads,
            cpu_matmul=args.cpu_matmul,
        )
        embedder = ClipEmbedder(model_cfg)
        bank = reference_bank(embedder, big_pattern, curate.CurateConfig().score.bank_size)
        bare_loop(embedder, big_pattern, args.batch, bank, limit=args.batch)  # warm-up
        pipeline_seconds(pattern, root / "warmup", args, args.n)  # imports, caches
        keys = ("batched", "pipeline", "pipeline_steady", "single")
        results: dict[str, list[float]] = {k: [] for k in keys}
        cpu: dict[str, list[float]] = {"batched": [], "pipeline_steady": []}
        after = bare_loop_rates(embedder, big_pattern, args.batch, bank)
        for rep in range(args.reps):
            before = after
            small, small_cpu = pipeline_times(pattern, root / f"small{rep}", args, args.n)
            big, big_cpu = pipeline_times(big_pattern, root / f"big{rep}", args, n_big)
            after = bare_loop_rates(embedder, big_pattern, args.batch, bank)
            results["batched"].append((before[0] + after[0]) / 2)
            results["pipeline"].append(n_big / big)
            results["pipeline_steady"].append((n_big - args.n) / max(big - small, 1e-9))
            results["single"].append(bare_loop(embedder, big_pattern, 1, bank, args.single_n))
            cpu["batched"].append((before[1] + after[1]) / 2)
            cpu["pipeline_steady"].append((n_big - args.n) / max(big_cpu - small_cpu, 1e-9))
            print(
                f"rep {rep}: "
                + ", ".join(f"{k} {v[-1]:.0f} pairs/s" for k, v in results.items())
                + f" (pipeline {args.n} rows {small:.1f} s, {n_big} rows {big:.1f} s); "
                + f"per CPU second: batched {cpu['batched'][-1]:.0f}, "
                + f"pipeline_steady {cpu['pipeline_steady'][-1]:.0f}",
                flush=True,
            )
        median = {k: statistics.median(v) for k, v in results.items()}
        # Each rep's pipeline runs against the bare loop runs around them: the machine's speed
        # drifts between reps, and a ratio of medians mixes reps.
        paired = [
            s / b for s, b in zip(results["pipeline_steady"], results["batched"], strict=True)
        ]
        # The same per CPU second of this process (all its threads): work done rather than
        # time taken, so it moves less when other processes share the cores.
        paired_cpu = [s / b for s, b in zip(cpu["pipeline_steady"], cpu["batched"], strict=True)]
        report = {
            "model": args.model,
            "cpu_matmul": args.cpu_matmul,
            "device": args.device,
            "rows": n_big,
            "threads": args.threads,
            "pairs_per_s": {k: round(v, 1) for k, v in median.items()},
            "pipeline_vs_batched": round(median["pipeline"] / median["batched"], 3),
            "steady_pipeline_vs_batched": round(median["pipeline_steady"] / median["batched"], 3),
            "steady_paired_ratios": [round(r, 3) for r in paired],
            "steady_paired_median": round(statistics.median(paired), 3),
            "steady_paired_cpu_ratios": [round(r, 3) for r in paired_cpu],
            "steady_paired_cpu_median": round(statistics.median(paired_cpu), 3),
            "pipeline_vs_single": round(median["pipeline"] / median["single"], 2),
        }
        print(
            f"pipeline / bare batched loop: end to end {report['pipeline_vs_batched']:.2f}x, "
            f"steady state {report['steady_pipeline_vs_batched']:.2f}x, paired per rep "
            f"{report['steady_paired_median']:.2f}x (target >= 0.9); per CPU second, paired "
            f"{report['steady_paired_cpu_median']:.2f}x"
        )
        print(f"pipeline / one-pair loop:     {report['pipeline_vs_single']:.1f}x (target >= 10)")
        if not args.skip_memory:
            small = write_split(root / "mem_small", args.memory_n)
            large = write_split(root / "mem_large", args.memory_n * args.memory_factor)
            base = measure_memory(small, root / "mem_out_small", args)
            big = measure_memory(large, root / "mem_out_large", args)
            report["peak_rss_mib"] = {
                str(args.memory_n): round(base, 1),
                str(args.memory_n * args.memory_factor): round(big, 1),
            }
            report["memory_growth"] = round(big / base, 3)
            print(
                f"peak RSS {base:.0f} MiB -> {big:.0f} MiB with {args.memory_factor}x the input: "
                f"{big / base:.2f}x (target < 1.5)"
            )
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
