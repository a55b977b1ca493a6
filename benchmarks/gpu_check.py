"""The GPU check: curate scoring, recaptioning and training on one device, pairs/s and memory.

Run by ``benchmarks/gpu_check.sh`` (which installs the wheels the GPU machine lacks first);
``--dry-run`` sizes everything down for a CPU and a micro model so the whole script is
known to work before a GPU is lent. All models are built from configs with random weights
(speed does not depend on them); all data is synthetic or made at run time.

1. ``curate``: ``benchmarks/curate_throughput.py`` (synthetic 32 px PNG rows): capgap curate
   on Beam against the bare batched scorer and the one-pair-at-a-time loop.
2. ``real_resolution``: ``benchmarks/real_resolution.py`` (1-12 MP JPEG photos): capgap
   curate vs its bare loop with full and draft JPEG decoding; the decode share.
3. ``decode_pool``: capgap's ``decode_image`` (draft on) over the same photos in a process
   pool of ``--decode_workers``: the decode rate a multi-worker runner can feed the GPU.
4. ``recaption``: a captioner of ViT-B/32 size (ViT encoder, 224 px, patch 32, width 768,
   12 layers; GPT-2 decoder, width 768) through ``RecaptionModelHandler.run_inference``.
5. ``train``: ``capgap train`` on a synthetic seed split at the model's image size; samples/s
   of the epochs after the first.
6. ``text_groups``: ``benchmarks/text_groups.py``: the text tower padded, in one pass cut to
   the batch's longest caption, and in capgap's length groups; whether the per-pass cost
   capgap assumes on an accelerator (``capgap.models.text_groups.group_overhead``) holds.

Targets printed beside the figures: clip-retrieval's published ViT-B/32 inference
(~1,500 pairs/s on an RTX 3080, ~2,500 on an A100, decode-bound); capgap's goal >= 5,000
pairs/s on an H100-class GPU including decode, and >= 10x the one-pair loop.

    python benchmarks/gpu_check.py --device cuda           # what gpu_check.sh runs
    python benchmarks/gpu_check.py --dry-run               # CPU, micro model, small sizes
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import contextlib
import functools
import io
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import curate_throughput  # noqa: E402
import real_resolution  # noqa: E402
import text_groups  # noqa: E402
import torch  # noqa: E402

from capgap.models.captioner import CaptionerConfig, load_captioner  # noqa: E402
from capgap.models.clip_handler import ClipModelConfig, model_input_side  # noqa: E402
from capgap.models.recaption_handler import RecaptionModelHandler  # noqa: E402
from capgap.models.tiny_captioner import (  # noqa: E402
    TinyCaptionerSpec,
    build_image_processor,
    build_model,
    build_tokenizer,
    save_captioner,
)
from capgap.pipeline import synth  # noqa: E402
from capgap.pipeline.train import TrainConfig, train  # noqa: E402
from capgap.transforms.decode import DecodeConfig, decode_image  # noqa: E402

TARGETS = (
    "targets: clip-retrieval ViT-B/32 ~1,500 pairs/s (RTX 3080), ~2,500 (A100), decode-bound; "
    "capgap >= 5,000 pairs/s on an H100-class GPU including decode, >= 10x the one-pair loop"
)


def memory(device: str) -> dict:
    """Peak device memory since the last reset (CUDA), or the process's peak RSS (CPU)."""
    if device.startswith("cuda"):
        return {
            "gpu_max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "gpu_max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        }
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run_printing(fn, argv: list[str]) -> dict:
    """Call a benchmark's ``main(argv)``, echo what it prints, return its last JSON line."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fn(argv)
    print(buffer.getvalue(), end="", flush=True)
    return last_json(buffer.getvalue())


def decode_one(raw: bytes, side: int) -> int:
    return decode_image(raw, DecodeConfig(model_max_side=side)).pixels.shape[0]


def decode_pool(workers: int, n: int, megapixels: list[float], side: int) -> dict:
    """Images/s of capgap's decode in ``workers`` processes, to the model's side ``side`` (as
    ``capgap curate`` decodes for that model)."""
    photos = real_resolution.make_photos(8, megapixels)
    items = [photos[i % len(photos)] for i in range(n)]
    decode = functools.partial(decode_one, side=side)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(decode, photos)  # start-up
        start = time.perf_counter()
        pool.map(decode, items, chunksize=4)
        seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "images": n,
        "model_max_side": side,
        "images_per_s": round(n / seconds, 1),
    }


def captioner_spec(small: bool) -> TinyCaptionerSpec:
    if small:
        return TinyCaptionerSpec(encoder="vit", image_size=32, patch_size=8)
    return TinyCaptionerSpec(
        encoder="vit",
        image_size=224,
        patch_size=32,
        encoder_hidden=768,
        encoder_layers=12,
        encoder_heads=12,
        encoder_mlp=3072,
        decoder_hidden=768,
        decoder_layers=6,
        decoder_heads=12,
    )


def recaption(root: Path, device: str, small: bool, n: int, batch: int) -> dict:
    spec = captioner_spec(small)
    tokenizer = build_tokenizer()
    model = build_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    folder = save_captioner(model, tokenizer, build_image_processor(spec.image_size), root / "cap")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    cfg = CaptionerConfig(
        model=str(folder), device=device, dtype=dtype, local_files_only=True, batch_size=batch
    )
    rows = synth_rows(root / "recap", n, spec.image_size)
    handler = RecaptionModelHandler(cfg, max_batch_size=batch)
    captioner = load_captioner(cfg)
    handler.run_inference(rows[:batch], captioner)  # warm-up
    reset(device)
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        handler.run_inference(rows[i : i + batch], captioner)
    seconds = time.perf_counter() - start
    return {
        "params_m": round(n_params / 1e6, 1),
        "pairs": len(rows),
        "batch": batch,
        "pairs_per_s": round(len(rows) / seconds, 1),
        **memory(device),
    }


def synth_rows(folder: Path, n: int, image_size: int) -> list[dict]:
    synth.run(
        synth.SynthConfig(out=str(folder), split="web", n=n, shards=1, image_size=image_size),
        show_progress=False,
    )
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((folder / "web").glob("*.parquet"))[0])
    return table.select(["uid", "image", "caption"]).to_pylist()


def train_rate(root: Path, model: str, device: str, n: int, batch: int, workers: int) -> dict:
    from capgap.models.clip_factory import create_clip

    image_size = create_clip(model)[0].visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple | list) else image_size
    synth.run(
        synth.SynthConfig(out=str(root), split="seed", n=n, shards=4, image_size=image_size),
        show_progress=False,
    )
    out = root / "run"
    reset(device)
    cfg = TrainConfig(
        model=model,
        data=str(root / "seed" / "*.parquet"),
        out_dir=str(out),
        epochs=3,
        batch_size=batch,
        device=device,
        precision="bf16" if device.startswith("cuda") else "fp32",
        num_workers=workers,
        progress=False,
        overwrite=True,
        log_every=10**6,
    )
    train(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in lines if r["kind"] == "epoch"]
    return {
        "pairs": n,
        "batch": batch,
        "samples_per_s_epochs": [round(r, 1) for r in rates],
        "samples_per_s": round(max(rates[1:] or rates), 1),
        **memory(device),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default=None, help="default ViT-B-32 (micro on --dry-run)")
    parser.add_argument("--dry-run", "--cpu", dest="dry_run", action="store_true")
    parser.add_argument("--decode_workers", type=int, default=0, help="0: CPU count")
    parser.add_argument(
        "--only", default="curate,real_resolution,decode_pool,recaption,train,text_groups"
    )
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = "cpu" if dry else args.device
    model = args.model or ("capgap-micro-vit" if dry else "ViT-B-32")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error("CUDA is not available here; use --dry-run on a CPU")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    workers = args.decode_workers or multiprocessing.cpu_count()
    only = set(args.only.split(","))
    print(TARGETS, flush=True)
    report: dict = {"device": device, "model": model, "dry_run": dry}
    started = time.perf_counter()

    def section(name: str, fn) -> None:
        if name not in only:
            return
        t0 = time.perf_counter()
        print(f"== {name} ({model} on {device})", flush=True)
        reset(device)
        result = fn()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result.update({k: v for k, v in memory(device).items() if k not in result})
        report[name] = result
        print(f"== {name}: {json.dumps(result)}", flush=True)

    threads = ["--threads", "1" if dry else "0"]
    section(
        "curate",
        lambda: run_printing(
            curate_throughput.main,
            ["--device", device, "--model", model, "--skip_memory", *threads]
            + (
                ["--n", "2560", "--scale", "2", "--reps", "1", "--single_n", "64", "--batch", "128"]
                if dry
                else ["--n", "3000", "--scale", "4", "--reps", "2", "--single_n", "300"]
            ),
        ),
    )
    section(
        "real_resolution",
        lambda: run_printing(
            real_resolution.main,
            ["--device", device, "--model", model, *threads]
            + (
                ["--n", "8", "--scale", "2", "--distinct", "4", "--mp", "1,4"]
                + ["--reps", "1", "--bank", "4", "--batch", "8"]
                if dry
                else ["--n", "32", "--scale", "3", "--distinct", "10", "--reps", "1"]
                + ["--bank", "16", "--batch", "32"]
            ),
        ),
    )
    section(
        "decode_pool",
        lambda: decode_pool(
            workers,
            16 if dry else 480,
            [1.0, 4.0] if dry else [1, 2, 4, 8, 12],
            model_input_side(ClipModelConfig(name=model)),
        ),
    )
    with tempfile.TemporaryDirectory(prefix="capgap-gpu-check-") as tmp:
        root = Path(tmp)
        section(
            "recaption",
            lambda: recaption(root / "r", device, dry, 64 if dry else 1024, 32 if dry else 256),
        )
        section(
            "train",
            lambda: train_rate(
                root / "t",
                model,
                device,
                512 if dry else 4096,
                128 if dry else 256,
                0 if dry else min(8, workers),
            ),
        )
    section(
        "text_groups",
        lambda: run_printing(
            text_groups.main,
            ["--device", device, "--model", model, *threads]
            + (
                ["--n", "128", "--batch", "32", "--reps", "1"]
                if dry
                else ["--n", "8192", "--batch", "256", "--reps", "2"]
            ),
        ),
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    summary = {
        "curate_pairs_per_s": report.get("curate", {}).get("pairs_per_s"),
        "curate_vs_batched": report.get("curate", {}).get("steady_paired_median"),
        "curate_vs_single": report.get("curate", {}).get("pipeline_vs_single"),
        "real_res_draft_pairs_per_s": report.get("real_resolution", {})
        .get("draft", {})
        .get("pipeline_pairs_per_s"),
        "decode_pool_images_per_s": report.get("decode_pool", {}).get("images_per_s"),
        "recaption_pairs_per_s": report.get("recaption", {}).get("pairs_per_s"),
        "train_samples_per_s": report.get("train", {}).get("samples_per_s"),
        "text_groups_over_one_pass": {
            k: v.get("groups_over_one_pass")
            for k, v in report.get("text_groups", {}).get("sets", {}).items()
        },
    }
    print("summary: " + json.dumps(summary), flush=True)
    print(TARGETS)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
