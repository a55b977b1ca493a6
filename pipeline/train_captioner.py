"""``capgap train-captioner``: train the embedded dense captioner on the ``seed`` split.

Reads Parquet shards with ``image`` (encoded bytes) and ``caption`` columns,
trains the small encoder -> GPT-2 ``VisionEncoderDecoderModel`` of
``capgap.models.tiny_captioner`` to write each image's caption, and saves model,
tokenizer and image processor in Hugging Face format (``save_pretrained``), so
``capgap curate`` loads it like any other HF captioner. With ``eval_data`` (a
labelled split such as ``test``) it reports, per label column, how often the
generated caption names the ground-truth value (``world.parse_caption``) and
writes ``metrics.json`` next to the model.

    capgap train-captioner --data data/synth/seed --eval_data data/synth/test --out runs/captioner
    capgap train-captioner --preset quick --set data=/tmp/synth/seed   # fast preset (demo)

Settings come from the packaged ``configs/captioner.yaml`` (``train`` section, or
``train_quick`` with ``--preset quick``). In process:
``path = train_captioner(load_train_config("quick", ["data=...", "out=..."]))``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capgap.core import world
from capgap.core.config import (
    ConfigError,
    load_config,
    parse_command,
    save_resolved,
)
from capgap.core.device import resolve_device
from capgap.core.files import expand_paths
from capgap.core.images import rgb_image
from capgap.models.optim import lr_at, make_adamw
from capgap.models.tiny_captioner import TinyCaptionerSpec


@dataclass
class TrainCaptionerConfig:
    data: str = field(
        default="data/synth/seed",
        metadata={"help": "Parquet folder or glob with image + caption columns (the seed split)"},
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "labelled Parquet folder/glob (e.g. the test split) to score after training"
        },
    )
    out: str = field(default="runs/captioner", metadata={"help": "output folder (HF format)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    epochs: int = field(default=20, metadata={"help": "passes over the training rows"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    max_rows: int | None = field(default=None, metadata={"help": "cap on training rows"})
    eval_rows: int | None = field(default=None, metadata={"help": "cap on evaluation rows"})
    eval_batch_size: int = field(default=256, metadata={"help": "generation batch size"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default all)"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | cuda:N"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    model: TinyCaptionerSpec = field(default_factory=TinyCaptionerSpec)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs and batch sizes must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")


# --- data ---------------------------------------------------------------------------------------


def read_rows(spec: str, columns: Sequence[str], limit: int | None = None) -> dict[str, list]:
    """Read ``columns`` from the shards at ``spec`` (in file order), at most ``limit`` rows."""
    import pyarrow.parquet as pq

    out: dict[str, list] = {c: [] for c in columns}
    for path in expand_paths(spec):
        table = pq.read_table(path, columns=list(columns))
        for c in columns:
            out[c].extend(table.column(c).to_pylist())
        if limit is not None and len(out[columns[0]]) >= limit:
            break
    if limit is not None:
        out = {c: v[:limit] for c, v in out.items()}
    return out


# --- evaluation ---------------------------------------------------------------------------------


def attribute_accuracy(
    captions: Sequence[str], labels: dict[str, Sequence[str]]
) -> dict[str, float]:
    """Per label column, the fraction of ``captions`` whose parsed value equals the label.

    A caption that does not name a value counts as wrong. Keys: the label columns
    present in ``labels`` (object and attributes), plus ``all`` (every column right).
    """
    names = [c for c in world.LABEL_COLUMNS if c in labels]
    if not names:
        raise ValueError("labels hold none of the world's label columns")
    n = len(captions)
    if n == 0:
        raise ValueError("no captions to score")
    hits = {c: 0 for c in names}
    every = 0
    for i, text in enumerate(captions):
        parsed = world.parse_caption(text)
        ok = [parsed[c] == labels[c][i] for c in names]
        for c, good in zip(names, ok, strict=True):
            hits[c] += int(good)
        every += int(all(ok))
    result = {c: hits[c] / n for c in names}
    result["all"] = every / n
    return result


def evaluate_captioner(
    model_dir: str | Path,
    data: str,
    rows: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, float]:
    """Load ``model_dir`` through the HF captioner path and score it on labelled ``data``."""
    from capgap.models.captioner import CaptionerConfig, load_captioner

    columns = ["image", *world.LABEL_COLUMNS]
    table = read_rows(data, columns, rows)
    captioner = load_captioner(
        CaptionerConfig(model=str(model_dir), batch_size=batch_size, device=device)
    )
    captions = captioner.caption([rgb_image(b) for b in table["image"]])
    return attribute_accuracy(captions, table)


# --- training -----------------------------------------------------------------------------------


def _encode_captions(tokenizer, captions: Sequence[str], max_length: int):
    import torch

    ids = [
        tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        for c in captions
    ]
    longest = max(map(len, ids))
    if longest > max_length:
        raise ValueError(f"a caption has {longest} tokens; model.max_length is {max_length}")
    labels = torch.full((len(ids), longest), -100, dtype=torch.long)
    for i, row in enumerate(ids):
        labels[i, : len(row)] = torch.tensor(row)
    return labels


def train_captioner(cfg: TrainCaptionerConfig) -> Path:
    """Train the embedded captioner as configured; returns the saved model folder."""
    import torch
    from tqdm import tqdm

    from capgap.models import tiny_captioner as tc

    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    tokenizer = tc.build_tokenizer()
    image_processor = tc.build_image_processor(cfg.model.image_size)
    model = tc.build_model(cfg.model, tokenizer).to(device)

    started = time.perf_counter()
    table = read_rows(cfg.data, ["image", "caption"], cfg.max_rows)
    images = [rgb_image(b) for b in table["image"]]
    pixels = image_processor(images, return_tensors="pt")["pixel_values"]
    labels = _encode_captions(tokenizer, table["caption"], cfg.model.max_length)
    n = len(labels)
    unknown = int((labels == tokenizer.unk_token_id).sum())
    if unknown:
        print(f"train-captioner: warning: {unknown} caption tokens are outside the vocabulary")

    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    # its own rules: decay off for < 2-D tensors and names with "norm" / "ln_", torch's eps,
    # and a warmup that is never shortened
    optimizer = make_adamw(model, cfg.lr, cfg.weight_decay, eps=1e-8, no_decay_keys=("norm", "ln_"))

    model.train()
    step = 0
    bar = tqdm(total=total, desc="train-captioner", unit="step", disable=not cfg.progress)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(rng.permutation(n))
        running, seen = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch_labels = labels[idx]
            width = int((batch_labels != -100).sum(1).max())
            lr = lr_at(step, total, cfg.lr, cfg.warmup_steps, clamp_warmup=False)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = model(
                pixel_values=pixels[idx].to(device), labels=batch_labels[:, :width].to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            running += out.loss.item() * len(idx)
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / seen:.3f}")
        history.append({"epoch": epoch + 1, "loss": running / seen})
    bar.close()
    train_s = time.perf_counter() - started
    model.eval()

    out_dir = tc.save_captioner(model.cpu(), tokenizer, image_processor, cfg.out)
    save_resolved(cfg, out_dir, "train_captioner_config.yaml")
    metrics: dict = {
        "train_rows": n,
        "epochs": cfg.epochs,
        "train_seconds": round(train_s, 2),
        "train_pairs_per_s": round(n * cfg.epochs / train_s, 1),
        "final_loss": history[-1]["loss"],
        "history": history,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if cfg.eval_data:
        metrics["accuracy"] = evaluate_captioner(
            out_dir, cfg.eval_data, cfg.eval_rows, cfg.eval_batch_size, cfg.device
        )
    with open(out_dir / "metrics.json", "w", encoding="utf-8") as fh:
        json.dump(metrics, fh, indent=2)
    return out_dir


PRESETS: dict[str, str] = {"default": "train", "quick": "train_quick"}  # -> captioner.yaml section


def load_train_config(
    preset: str = "default", overrides: Sequence[str] = (), config: str = "captioner"
) -> TrainCaptionerConfig:
    """The ``preset`` section of ``config`` (default: the packaged captioner.yaml) + overrides.

    ``train_captioner(load_train_config("quick", ["data=...", "out=..."]))`` is what the
    demo runs in process.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return load_config(TrainCaptionerConfig, config, overrides, section=PRESETS[preset])


def _preset_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="section of the config file: default (train) or quick (train_quick)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_command(
        argv,
        "capgap train-captioner",
        __doc__,
        TrainCaptionerConfig,
        "captioner",
        arguments=_preset_argument,
        section=lambda args: PRESETS[args.preset],
    )
    out_dir = train_captioner(cfg)
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    print(
        f"saved {out_dir} ({metrics['parameters']} parameters, {metrics['train_rows']} rows x "
        f"{metrics['epochs']} epochs in {metrics['train_seconds']} s, final loss "
        f"{metrics['final_loss']:.4f})"
    )
    if "accuracy" in metrics:
        print("accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["accuracy"].items()))
    return 0
