"""A CLIP's towers with torch's linear layers against the same towers routed through oneDNN.

What ``model.cpu_matmul`` buys (``capgap.models.onednn_linear``), in one process on one
machine: first the bare float32 product of the image tower's MLP shape (a batch's tokens, 50
an image for ViT-B/32, width -> 4 x width) through ``torch.nn.functional.linear`` (MKL's
sgemm on x86 torch wheels) and through oneDNN's linear, in GFLOP/s; then the random-init
model's image and text towers (``--model``, an open_clip name, default ViT-B-32; or
``--hf``, a transformers CLIP of ViT-B/32's size) over the same batches, torch's layers and
routed layers alternating per rep so the VM's drift hits both alike, ms a pair (best and
median of ``--reps``), the paired ratio and the largest feature difference. Inference only
(``torch.inference_mode``); glibc's large blocks kept as ``capgap curate`` keeps them.
Prints one JSON line at the end.

    python benchmarks/onednn_linear.py                         # ViT-B-32, 2 threads
    python benchmarks/onednn_linear.py --hf
    python benchmarks/onednn_linear.py --model capgap-micro-vit --batch 256
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()

import argparse
import copy
import functools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from text_groups import captions, vit_b32_hf_clip  # the sibling benchmark

from capgap.core.malloc import keep_large_blocks
from capgap.models import onednn_linear
from capgap.models.clip_factory import create_clip
from capgap.models.hf_clip import load_hf_clip
from capgap.models.onednn_linear import onednn_linear_available, use_onednn_linears


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rates(rows: int, width: int, reps: int) -> dict[str, float]:
    """GFLOP/s of one (rows x width) @ (width x 4 width) product, torch's linear and oneDNN's."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator)
    weight = torch.randn(4 * width, width, generator=generator)
    bias = torch.randn(4 * width, generator=generator)
    flop = 2 * rows * width * 4 * width
    products = {"torch": F.linear, "onednn": onednn_linear.linear}
    rates: dict[str, list[float]] = {name: [] for name in products}
    with torch.inference_mode():
        for product in products.values():
            product(x, weight, bias)  # warm-up
        for _ in range(reps):
            for name, product in products.items():
                seconds = best_seconds(functools.partial(product, x, weight, bias), 3)
                rates[name].append(flop / seconds / 1e9)
    return {name: round(statistics.median(values), 1) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--hf", action="store_true", help="a transformers CLIP of ViT-B/32's size")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2, help="batches a rep runs")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if not onednn_linear_available():
        print("oneDNN's linear is not available in this torch build on this CPU")
        return 1
    keep_large_blocks()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    if args.hf:
        folder = vit_b32_hf_clip(tmp.name)
        model, _, tokenizer = load_hf_clip(folder)
        label = "transformers CLIP, ViT-B/32 size"
    else:
        model, _, tokenizer = create_clip(args.model)
        label = args.model
    model.eval()
    routed = copy.deepcopy(model)
    layers = use_onednn_linears(routed)
    # the image side and the image tower's MLP product: a batch's tokens (patches + class
    # token) x width
    if args.hf:
        vision = model.hf.config.vision_config
        side, width = vision.image_size, vision.hidden_size
        tokens_per_image = (side // vision.patch_size) ** 2 + 1
    else:
        side = model.visual.image_size
        side = side[0] if isinstance(side, tuple) else side
        width = model.visual.transformer.width
        tokens_per_image = model.visual.positional_embedding.shape[0]
    generator = torch.Generator().manual_seed(1)
    images = [
        torch.randn(args.batch, 3, side, side, generator=generator) for _ in range(args.batches)
    ]
    texts = captions(args.batch * args.batches, long_tail=False)
    tokens = [tokenizer(texts[i * args.batch : (i + 1) * args.batch]) for i in range(args.batches)]

    def towers(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.cat([m.encode_image(x) for x in images])
        txt = torch.cat([m.encode_text(t) for t in tokens])
        return img, txt

    pairs = args.batch * args.batches
    times: dict[str, list[float]] = {"torch": [], "onednn": []}
    with torch.inference_mode():
        ref_img, ref_txt = towers(model)
        got_img, got_txt = towers(routed)
        for _ in range(args.reps):
            for name, m in (("torch", model), ("onednn", routed)):
                start = time.perf_counter()
                towers(m)
                times[name].append(time.perf_counter() - start)
    rows = args.batch * tokens_per_image
    gemm = gemm_rates(rows, width, args.reps)
    paired = statistics.median(a / b for a, b in zip(times["torch"], times["onednn"], strict=True))
    report = {
        "model": label,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "pairs_per_rep": pairs,
        "layers_routed": layers,
        "gemm_gflops": gemm,
        "ms_per_pair": {
            name: {
                "best": round(min(v) * 1000 / pairs, 2),
                "median": round(statistics.median(v) * 1000 / pairs, 2),
            }
            for name, v in times.items()
        },
        "torch_over_onednn_paired": round(paired, 3),
        "max_abs_diff": {
            "image": float((ref_img - got_img).abs().max()),
            "text": float((ref_txt - got_txt).abs().max()),
        },
    }
    ms = report["ms_per_pair"]
    print(
        f"{label}, batch {args.batch}, {report['threads']} threads, {layers} layers routed\n"
        f"  MLP product ({rows} x {width} @ {width} x {4 * width}): torch "
        f"{gemm['torch']:.0f} GFLOP/s, oneDNN {gemm['onednn']:.0f} GFLOP/s\n"
        f"  towers (image + text): torch {ms['torch']['median']:.2f} ms a pair, oneDNN "
        f"{ms['onednn']['median']:.2f} (medians of {args.reps}); paired ratio {paired:.2f}x\n"
        f"  largest feature difference: image {report['max_abs_diff']['image']:.1e}, "
        f"text {report['max_abs_diff']['text']:.1e}"
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
