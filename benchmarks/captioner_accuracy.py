"""Benchmark the dense captioner: attribute accuracy, recaption throughput, imbalance before/after.

    .venv/bin/python benchmarks/captioner_accuracy.py --data /tmp/synth --model runs/captioner \
        [--clip-run runs/reference-clip] [--threads 2]

* accuracy: on the held-out ``test`` split, the fraction of generated captions
  that name the ground-truth object and each attribute (``world.parse_caption``
  against the label columns); target >= 0.90 for every column;
* throughput: ``RecaptionModelHandler.run_inference`` (PNG decode + generate) on
  ``web`` rows on CPU, in pairs/s per batch size;
* imbalance (with ``--clip-run``, a reference CLIP run folder): the ``imbalance``
  score of ``transforms/score.py`` (normalised softmax entropy against a bank of
  web images, the reference CLIP's temperature) of web rows with their original
  caption and with the dense recaption: medians over all matched rows and per k.

Without ``--model`` it trains the captioner first with the quick preset; without
``--data`` it writes a small synthetic world to a temporary folder.
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from capgap.core import world
from capgap.core.config import load_config
from capgap.core.images import rgb_image
from capgap.models.captioner import CaptionerConfig, load_captioner
from capgap.models.recaption_handler import RecaptionModelHandler
from capgap.pipeline import synth
from capgap.pipeline.train_captioner import (
    attribute_accuracy,
    load_train_config,
    read_rows,
    train_captioner,
)

TARGET_ACCURACY = 0.90


def _synth(out: Path) -> Path:
    overrides = ["splits.seed.n=4000", "splits.web.n=1000", "splits.test.n=500", "shards=1"]
    cfg = load_config(synth.SynthConfig, "synth", [f"out={out}", *overrides])
    synth.run(cfg, show_progress=False)
    return out


def accuracy(model: str, data: Path, rows: int) -> dict[str, float]:
    table = read_rows(str(data / "test"), ["image", *world.LABEL_COLUMNS], rows)
    captioner = load_captioner(CaptionerConfig(model=model, batch_size=256))
    images = [rgb_image(b) for b in table["image"]]
    return attribute_accuracy(captioner.caption(images), table)


def throughput(model: str, data: Path, rows: int, batch_sizes: list[int]) -> dict[int, float]:
    table = read_rows(str(data / "web"), ["uid", "image", "caption"], rows)
    batch = [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
    rates = {}
    for size in batch_sizes:
        handler = RecaptionModelHandler(CaptionerConfig(model=model, batch_size=size))
        loaded = handler.load_model()
        list(handler.run_inference(batch[:size], loaded))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(batch), size):
            list(handler.run_inference(batch[i : i + size], loaded))
        rates[size] = len(batch) / (time.perf_counter() - start)
    return rates


def imbalance(model: str, data: Path, clip_run: str, rows: int, bank_size: int) -> dict:
    """Median imbalance of web rows with original vs recaptioned captions."""
    from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig
    from capgap.transforms.score import ScoreConfig, pair_scores

    columns = ["uid", "image", "caption", "k", "mismatched"]
    table = read_rows(str(data / "web"), columns, max(rows, bank_size))
    embedder = ClipEmbedder(ClipModelConfig(run_dir=clip_run))
    pixels = [np.asarray(rgb_image(b)) for b in table["image"]]

    def embed(texts: list[str], idx: range) -> tuple[np.ndarray, np.ndarray, float]:
        outs = [
            embedder.embed([pixels[i] for i in idx[j : j + 256]], texts[j : j + 256])
            for j in range(0, len(idx), 256)
        ]
        return (
            np.concatenate([o[0] for o in outs]),
            np.concatenate([o[1] for o in outs]),
            outs[0][2],
        )

    bank_idx = range(min(bank_size, len(pixels)))
    bank_images, bank_texts, scale = embed([table["caption"][i] for i in bank_idx], bank_idx)
    tau = 1.0 / scale
    n = min(rows, len(pixels))
    idx = range(n)
    captioner = load_captioner(CaptionerConfig(model=model, batch_size=256))
    dense = captioner.caption([rgb_image(table["image"][i]) for i in idx])
    cfg = ScoreConfig()
    result: dict = {"rows": n, "bank": len(bank_idx), "tau": tau, "by_k": {}}
    scores = {}
    for name, texts in (("before", table["caption"][:n]), ("after", dense)):
        img, txt, _ = embed(list(texts), idx)
        scores[name] = np.asarray(
            [
                pair_scores(
                    img[i],
                    txt[i],
                    bank_images,
                    tau,
                    cfg,
                    i if i < len(bank_idx) else None,
                    bank_texts=bank_texts,
                )["imbalance"]
                for i in idx
            ]
        )
    matched = np.asarray([not table["mismatched"][i] for i in idx])
    ks = np.asarray(table["k"][:n])
    for name in ("before", "after"):
        result[f"median_{name}"] = float(np.median(scores[name][matched]))
    for k in sorted(set(ks[matched].tolist())):
        sel = matched & (ks == k)
        result["by_k"][int(k)] = (
            int(sel.sum()),
            float(np.median(scores["before"][sel])),
            float(np.median(scores["after"][sel])),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", help="synthetic world root (seed/, web/, test/)")
    parser.add_argument(
        "--model", help="trained captioner folder (default: train one, quick preset)"
    )
    parser.add_argument("--clip-run", help="reference CLIP run folder for the imbalance check")
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--web-rows", type=int, default=512)
    parser.add_argument("--bank-size", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="capgap-bench-")
    data = Path(args.data) if args.data else _synth(Path(tmp.name) / "synth")
    model = args.model
    if model is None:
        cfg = load_train_config(
            "quick", [f"data={data / 'seed'}", "eval_data=null", f"out={Path(tmp.name) / 'cap'}"]
        )
        start = time.perf_counter()
        model = str(train_captioner(cfg))
        print(f"trained the quick preset in {time.perf_counter() - start:.0f} s -> {model}")

    acc = accuracy(model, data, args.test_rows)
    print(
        f"attribute accuracy on {args.test_rows} held-out test images (target >= {TARGET_ACCURACY}):"
    )
    for name, value in acc.items():
        flag = "" if name == "all" or value >= TARGET_ACCURACY else "  BELOW TARGET"
        print(f"  {name:<11} {value:.3f}{flag}")

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rates = throughput(model, data, args.web_rows, sizes)
    print(f"recaption throughput on CPU ({args.threads} threads, decode + generate):")
    for size, rate in rates.items():
        print(f"  batch {size:>4}: {rate:8.1f} pairs/s")

    if args.clip_run:
        imb = imbalance(model, data, args.clip_run, args.web_rows, args.bank_size)
        print(
            f"imbalance of {imb['rows']} web rows (bank {imb['bank']}, tau {imb['tau']:.4f}), "
            f"matched pairs: median before {imb['median_before']:.3f} -> after "
            f"{imb['median_after']:.3f}"
        )
        for k, (count, before, after) in imb["by_k"].items():
            print(f"  k={k} ({count:>4} rows): {before:.3f} -> {after:.3f}")
    ok = all(v >= TARGET_ACCURACY for k, v in acc.items() if k != "all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
