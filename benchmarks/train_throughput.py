"""Training throughput: ``capgap train`` against a bare open_clip loop, in one process.

Both train the same architecture with the same batch size, optimiser (fused AdamW unless
``--bare_unfused``) and data (a
synthetic seed split written to a temporary folder). The bare loop is the floor
of what open_clip itself costs: images decoded and tokenised once up front, then
forward, open_clip's ClipLoss, backward, AdamW. ``capgap train`` streams and
decodes Parquet in DataLoader workers, schedules the learning rate, logs and
checkpoints every epoch. Runs alternate (bare, capgap, bare, capgap, ...) so that
load from other processes hits both alike; the first epoch of every run is
excluded as warm-up. Prints samples/s for each, the ratio of the medians and the
median of the per-rep ratios (each rep's capgap epochs against the bare epochs run
just before them: drift in the machine's speed cancels), target >= 0.9.

``--cache_decoded`` turns on ``data_opts.cache_decoded`` (decode in the training
process once, then train from memory, as the bare loop does); without it every
epoch streams and decodes Parquet again, the cost a dataset too large for RAM pays.

    python benchmarks/train_throughput.py                      # micro CLIP, 2048 pairs
    python benchmarks/train_throughput.py --num_workers 0 --threads 2 --cache_decoded
    python benchmarks/train_throughput.py --n 4096 --epochs 4 --reps 3 --num_workers 1 --threads 1
    python benchmarks/train_throughput.py --model capgap-micro-rn --batch_size 128 --num_workers 0 \
        --threads 1 --cache_decoded --bare_unfused     # the demo's setting vs open_clip's AdamW
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import pyarrow.parquet as pq
import torch

from capgap.core.files import expand_paths
from capgap.core.images import rgb_image
from capgap.models.clip_factory import create_clip
from capgap.pipeline import synth
from capgap.pipeline.train import DataConfig, TrainConfig, train


def load_tensors(files: list[Path], preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    images, captions = [], []
    for path in files:
        table = pq.read_table(path, columns=["image", "caption"]).to_pydict()
        for raw, caption in zip(table["image"], table["caption"], strict=True):
            images.append(preprocess(rgb_image(raw)))
            captions.append(caption)
    return torch.stack(images), tokenizer(captions)


def bare_open_clip(
    model_name: str, images, texts, batch_size: int, epochs: int, lr: float, fused: bool
) -> list[float]:
    """Samples/s per epoch of a plain open_clip training loop on in-memory tensors.

    ``fused``: torch's fused AdamW, as ``capgap train`` uses; without it the per-tensor
    AdamW that open_clip's own training script gets by default.
    """
    torch.manual_seed(0)
    model, _, _ = create_clip(model_name)
    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=fused
    )
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        order = torch.randperm(len(images))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            img, txt, scale = model(images[idx], texts[idx])
            loss = loss_fn(img, txt, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def capgap_train(
    model_name: str,
    data: str,
    out: Path,
    batch_size: int,
    epochs: int,
    lr: float,
    num_workers: int,
    cache_decoded: bool = False,
) -> list[float]:
    """Samples/s per epoch of ``capgap train`` (read from its metrics.jsonl)."""
    cfg = TrainConfig(
        model=model_name,
        data=data,
        out_dir=str(out),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        num_workers=num_workers,
        progress=False,
        overwrite=True,
        log_every=10**6,
        data_opts=DataConfig(cache_decoded=cache_decoded),
    )
    train(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in lines if r["kind"] == "epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="capgap-micro-vit")
    parser.add_argument("--n", type=int, default=2048, help="training pairs")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up")
    parser.add_argument("--reps", type=int, default=4, help="alternating runs of each")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads, 0 = default")
    parser.add_argument(
        "--cache_decoded", action="store_true", help="data_opts.cache_decoded (num_workers 0)"
    )
    parser.add_argument(
        "--bare_unfused",
        action="store_true",
        help="bare loop with open_clip's default per-tensor AdamW (capgap's is fused): "
        "the ratio then includes what the fused optimiser buys",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image_size = create_clip(args.model)[0].visual.image_size
        image_size = image_size if isinstance(image_size, int) else image_size[0]  # ResNet: int
        synth.run(
            synth.SynthConfig(
                out=str(tmp), split="seed", n=args.n, shards=4, image_size=image_size
            ),
            show_progress=False,
        )
        data = str(tmp / "seed" / "*.parquet")
        _, preprocess, tokenizer = create_clip(args.model)
        images, texts = load_tensors(expand_paths(data), preprocess, tokenizer)
        bare, ours, paired = [], [], []
        for rep in range(args.reps):
            b = bare_open_clip(
                args.model,
                images,
                texts,
                args.batch_size,
                args.epochs,
                1e-3,
                fused=not args.bare_unfused,
            )[1:]
            c = capgap_train(
                args.model,
                data,
                tmp / "run",
                args.batch_size,
                args.epochs,
                1e-3,
                args.num_workers,
                args.cache_decoded,
            )[1:]
            print(
                f"rep {rep}: bare open_clip {[round(r) for r in b]} samples/s, "
                f"capgap train {[round(r) for r in c]} samples/s"
            )
            bare += b
            ours += c
            paired.append(statistics.median(c) / statistics.median(b))
    b, c = statistics.median(bare), statistics.median(ours)
    print(
        f"{args.model}, batch {args.batch_size}, {args.n} pairs, {torch.get_num_threads()} threads, "
        f"num_workers {args.num_workers}, cache_decoded {args.cache_decoded}, "
        f"bare AdamW {'per-tensor' if args.bare_unfused else 'fused'}"
    )
    print(f"bare open_clip loop: {b:.0f} samples/s (median of {len(bare)} epochs)")
    print(f"capgap train:        {c:.0f} samples/s (median of {len(ours)} epochs)")
    print(f"ratio capgap / bare: {c / b:.2f} of the medians")
    print(
        f"paired ratio:        {statistics.median(paired):.2f} median of the reps "
        f"{[round(r, 2) for r in paired]} (target >= 0.9)"
    )


if __name__ == "__main__":
    main()
