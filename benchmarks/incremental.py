"""Scheduled builds: an incremental ``capgap curate --cache`` build against a from-scratch one.

A synthetic ``web`` input of ``--shards`` shards grows by ``--new_shards`` (10% by default);
recaptioning is on (the embedded captioner's architecture, random weights unless
``--captioner DIR`` names a trained one: the compute per caption is the same, at
``--max_new_tokens``) with the CLIP quality gate, and the curate preset's absolute decision
rules (a fraction rule would move old rows' decisions as the input grows). Builds, in one process, on the DirectRunner (in_memory):

1. ``scratch``: the grown input, no cache (what a scheduled build costs today);
2. ``warm``: the input before it grew, with an empty cache (fills it; also the cold-cache
   cost: keyed join + entry writes, against ``scratch`` scaled by rows);
3. ``incremental``: the grown input with that cache: only the new rows are embedded and
   recaptioned;
4. ``rerun``: the grown input again: nothing is computed.

Prints each build's wall time and cache hit / miss counters, the ratio incremental / scratch
(target <= 0.25) and whether the incremental build's rows equal the from-scratch build's
(floats to 1e-5, benchmarks/cluster_check.py ``same_rows``). One JSON line at the end.

    python benchmarks/incremental.py                        # 10 + 1 shards of 100 rows
    python benchmarks/incremental.py --shards 20 --rows_per_shard 200 --captioner runs/captioner
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from capgap.models import tiny_captioner as tc
from capgap.models.clip_factory import create_clip, save_checkpoint
from capgap.pipeline import curate
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms.schema import OUTPUTS

_spec = importlib.util.spec_from_file_location(
    "cluster_check", Path(__file__).with_name("cluster_check.py")
)
cluster_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cluster_check)


def write_shards(folder: Path, first: int, count: int, rows: int) -> None:
    split = SplitConfig(n=10**6, mismatch_rate=0.2)
    for s in range(first, first + count):
        table = pa.Table.from_pylist(
            [make_row(s * rows + i, "web", split, 0, 32, 0.05) for i in range(rows)],
            schema=SCHEMA,
        )
        pq.write_table(table, folder / f"web-{s:04d}.parquet")


def reference_run(folder: Path, model: str) -> Path:
    torch.manual_seed(0)
    clip, _, _ = create_clip(model)
    folder.mkdir()
    save_checkpoint(clip, folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    return folder


def random_captioner(folder: Path) -> Path:
    """The embedded captioner's architecture (XCiT encoder + GPT-2 decoder), untrained."""
    torch.manual_seed(0)
    tok = tc.build_tokenizer()
    spec = tc.TinyCaptionerSpec()
    model = tc.build_model(spec, tok)
    return tc.save_captioner(model, tok, tc.build_image_processor(spec.image_size), folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--new_shards", type=int, default=1)
    parser.add_argument("--rows_per_shard", type=int, default=100)
    parser.add_argument("--model", default="capgap-micro-vit")
    parser.add_argument("--captioner", default=None, help="a captioner folder (default: random)")
    parser.add_argument(
        "--max_new_tokens", type=int, default=20, help="a dense caption: ~13 words, ~20 tokens"
    )
    parser.add_argument("--bank_size", type=int, default=128)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="capgap-incremental-"))
    data = root / "in"
    data.mkdir(parents=True)
    write_shards(data, 0, args.shards, args.rows_per_shard)
    clip = reference_run(root / "clip", args.model)
    captioner = Path(args.captioner) if args.captioner else random_captioner(root / "captioner")
    sets = [
        f"score.bank_size={args.bank_size}",
        "recaption.enabled=true",
        f"recaption.stage.captioner.model={captioner}",
        f"recaption.stage.captioner.max_new_tokens={args.max_new_tokens}",
        "recaption.stage.gate.enabled=true",
        f"recaption.stage.gate.clip_run={clip}",
    ]

    def build(name: str, cache: Path | None) -> dict:
        argv = ["--input", str(data / "*.parquet"), "--output", str(root / name)]
        argv += ["--reference", str(clip), "--direct_running_mode=in_memory"]
        argv += [f"--set={s}" for s in sets]
        if cache is not None:
            argv += ["--cache", str(cache)]
        started = time.perf_counter()
        manifest = curate.run(argv)
        manifest["_wall_s"] = time.perf_counter() - started
        cached = {k: v for k, v in manifest["metrics"].items() if k.startswith("cache.")}
        print(
            f"{name:<12} rows_in={manifest['counts']['rows_in']:<6} "
            f"recaptioned={manifest['counts']['curated_by_decision'].get('recaption', 0):<5} "
            f"{manifest['_wall_s']:7.1f} s  {cached}",
            flush=True,
        )
        return manifest

    cache = root / "cache"
    warm = build("warm", cache)
    write_shards(data, args.shards, args.new_shards, args.rows_per_shard)
    scratch = build("scratch", None)
    incremental = build("incremental", cache)
    rerun = build("rerun", cache)

    a, b = cluster_check.rows_of(root / "scratch"), cluster_check.rows_of(root / "incremental")
    equal = all(cluster_check.same_rows(a[n], b[n]) for n in OUTPUTS)
    c = cluster_check.rows_of(root / "rerun")
    rerun_equal = all(cluster_check.same_rows(b[n], c[n]) for n in OUTPUTS)
    ratio = incremental["_wall_s"] / scratch["_wall_s"]
    rows_before = args.shards * args.rows_per_shard
    rows_after = rows_before + args.new_shards * args.rows_per_shard
    cold_ratio = (warm["_wall_s"] / rows_before) / (scratch["_wall_s"] / rows_after)
    print(f"incremental / scratch wall time: {ratio:.3f} (target <= 0.25)")
    print(f"rerun / scratch wall time: {rerun['_wall_s'] / scratch['_wall_s']:.3f}")
    print(f"cold cache (per row) / no cache (per row): {cold_ratio:.3f}")
    print(f"incremental rows == scratch rows (floats to 1e-5): {equal}")
    print(f"rerun rows == incremental rows (floats to 1e-5): {rerun_equal}")
    summary = {
        "rows_before": rows_before,
        "rows_after": rows_after,
        "wall_s": {
            name: round(m["_wall_s"], 2)
            for name, m in (
                ("warm", warm),
                ("scratch", scratch),
                ("incremental", incremental),
                ("rerun", rerun),
            )
        },
        "incremental_over_scratch": round(ratio, 4),
        "cold_cache_per_row_over_no_cache": round(cold_ratio, 4),
        "incremental_cache": incremental["cache"]["stages"],
        "rerun_cache": rerun["cache"]["stages"],
        "incremental_equals_scratch": equal,
        "rerun_equals_incremental": rerun_equal,
        "workdir": str(root),
    }
    print(json.dumps(summary))
    return 0 if equal and rerun_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
