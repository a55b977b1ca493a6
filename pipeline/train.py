"""``capgap train``: train or fine-tune a CLIP model on Parquet image-caption shards.

One loop you can read top to bottom (in the spirit of nanoGPT): build the model
(random init or ``pretrained``), stream pairs from Parquet with DataLoader
workers, optimise a contrastive loss (clip | siglip | cua | cuaxu) with AdamW,
linear warmup and cosine decay, on CPU or CUDA (bf16/fp16 autocast). Every epoch
writes a checkpoint into ``out_dir/checkpoints`` (``--resume`` continues from
the newest); ``metrics.jsonl`` gets one JSON line per logged step and per epoch
with every loss part; ``config.yaml`` holds the resolved config and the final
weights land in ``out_dir/model.safetensors`` (read back with
``capgap.models.clip_factory.load_run``).

    capgap train --data 'data/synth/seed/*.parquet' --out_dir runs/seed
    capgap train --loss cua --temperature 0.01 --epochs 15 --out_dir runs/cua
    capgap train --config train_finetune_b32 --data 'curated/*.parquet' --device cuda
    capgap train --out_dir runs/seed --resume                # continue after a crash

In Python: ``train(TrainConfig(data=..., out_dir=...)) -> Path`` (the out_dir).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from capgap.core.config import (
    parse_command,
    save_resolved,
)
from capgap.core.device import resolve_device
from capgap.core.files import expand_paths
from capgap.models.clip_factory import create_clip, save_checkpoint
from capgap.models.losses import build_loss
from capgap.models.optim import lr_at, make_adamw
from capgap.pipeline.parquet_data import ParquetPairs


@dataclass
class DataConfig:
    image_column: str = "image"
    caption_column: str = "caption"
    # Mixed with caption_column when present (recaptioned data keeps the original alt-text).
    original_caption_column: str | None = "original_caption"
    dense_prob: float = 0.8  # P(use caption_column) when both exist (Recap-DataComp-1B: 0.8)
    shuffle_buffer: int = 2048
    rows_per_unit: int = 2048  # row groups are cut into slices of this size for the workers
    # Keep decoded images and token ids in memory after first use (data that fits in RAM;
    # num_workers 0).
    cache_decoded: bool = False


@dataclass
class OptimConfig:
    weight_decay: float = 0.1  # not applied to gains, biases, embeddings of size 1, logit scale
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip_norm: float | None = None


@dataclass
class LossConfig:
    uniform_weight: float = 1.0  # CUA / CUAXU (Fahim et al.)
    align_weight: float = 1.0
    xuniform_weight: float = 1.0  # CUAXU only
    siglip_init_scale: float = 10.0  # SigLIP init (Zhai et al.): t' = log 10, b = -10
    siglip_init_bias: float = -10.0


@dataclass
class TrainConfig:
    model: str = field(default="capgap-micro-vit", metadata={"help": "architecture name"})
    pretrained: str | None = field(
        default=None, metadata={"help": "open_clip tag or checkpoint path (fine-tune)"}
    )
    data: str = field(
        default="data/synth/seed/*.parquet", metadata={"help": "Parquet glob(s), comma-separated"}
    )
    out_dir: str = field(default="runs/train", metadata={"help": "run folder"})
    loss: Literal["clip", "siglip", "cua", "cuaxu"] = field(
        default="clip", metadata={"help": "clip | siglip | cua | cuaxu"}
    )
    temperature: float | None = field(
        default=None, metadata={"help": "fixed temperature tau; null = learnable"}
    )
    epochs: int = field(default=10, metadata={"help": "epochs to train (in total, with --resume)"})
    batch_size: int = field(default=256, metadata={"help": "pairs per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    seed: int = field(default=0, metadata={"help": "seed for init and data order"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | cuda:N"})
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32", metadata={"help": "fp32, or bf16/fp16 autocast"}
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads; 0 = torch's default (use 1 on busy CPUs)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from out_dir's last checkpoint"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run in out_dir"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl lines"})
    keep_checkpoints: int = field(default=2, metadata={"help": "epoch checkpoints to keep"})
    progress: bool = field(default=True, metadata={"help": "show the tqdm bar"})
    data_opts: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss_opts: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_workers < 0 or self.threads < 0:
            raise ValueError("num_workers and threads must be >= 0")
        if self.data_opts.cache_decoded and self.num_workers:
            raise ValueError(
                "data_opts.cache_decoded needs num_workers 0 (worker processes are rebuilt "
                "every epoch, so their caches would be lost)"
            )
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError("temperature must be positive")


# --- pieces the loop uses ----------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def checkpoint_paths(out_dir: Path) -> list[Path]:
    """Epoch checkpoints in out_dir, oldest first."""
    return sorted((out_dir / "checkpoints").glob("epoch_*.pt"))


def prepare_out_dir(cfg: TrainConfig) -> Path:
    """Create out_dir; refuse to mix a new run into an old one unless resume/overwrite."""
    out = Path(cfg.out_dir)
    previous = checkpoint_paths(out) + [p for p in (out / "model.safetensors",) if p.exists()]
    if previous and not cfg.resume:
        if not cfg.overwrite:
            raise FileExistsError(
                f"{out} already holds a run ({previous[-1].name}); pass --resume to continue "
                "it or --overwrite to replace it"
            )
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for stale in ("model.safetensors", "metrics.jsonl"):
            (out / stale).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_training_state(out_dir: Path, state: dict, keep: int) -> Path:
    """Write checkpoints/epoch_NNNN.pt atomically and keep only the newest ``keep``."""
    path = out_dir / "checkpoints" / f"epoch_{state['epoch']:04d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    for old in checkpoint_paths(out_dir)[:-keep]:
        old.unlink()
    return path


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


# --- the training run --------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Train as configured; returns out_dir (with model.safetensors, config.yaml, metrics.jsonl)."""
    device = resolve_device(cfg.device)
    out = prepare_out_dir(cfg)
    save_resolved(cfg, out)
    metrics_path = out / "metrics.jsonl"
    seed_everything(cfg.seed)
    if cfg.threads:  # on an oversubscribed CPU, spinning OpenMP threads cost more than they give
        torch.set_num_threads(cfg.threads)

    # Model. SigLIP needs a learnable logit bias; start it (and the scale) at SigLIP's init.
    model_kwargs = {}
    if cfg.loss == "siglip":
        model_kwargs = {
            "init_logit_bias": cfg.loss_opts.siglip_init_bias,
            "init_logit_scale": math.log(cfg.loss_opts.siglip_init_scale),
        }
    model, preprocess, tokenizer = create_clip(cfg.model, cfg.pretrained, device, **model_kwargs)
    if cfg.temperature is not None:  # fixed temperature: freeze logit_scale at log(1/tau)
        model.logit_scale.data.fill_(math.log(1.0 / cfg.temperature))
        model.logit_scale.requires_grad_(False)
    model.output_dict = True
    loss_fn = build_loss(
        cfg.loss,
        uniform_weight=cfg.loss_opts.uniform_weight,
        align_weight=cfg.loss_opts.align_weight,
        xuniform_weight=cfg.loss_opts.xuniform_weight,
    )

    # Data: Parquet shards streamed by DataLoader workers, a fresh shuffle every epoch.
    d = cfg.data_opts
    dataset = ParquetPairs(
        expand_paths(cfg.data),
        transform=preprocess,
        tokenizer=tokenizer,
        image_column=d.image_column,
        caption_column=d.caption_column,
        original_caption_column=d.original_caption_column,
        dense_prob=d.dense_prob,
        shuffle_buffer=d.shuffle_buffer,
        rows_per_unit=d.rows_per_unit,
        seed=cfg.seed,
        cache_decoded=d.cache_decoded,
    )
    steps_per_epoch = dataset.batches_per_epoch(cfg.batch_size, cfg.num_workers)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{dataset.num_rows} rows give no full batch of {cfg.batch_size} "
            f"over {max(1, cfg.num_workers)} worker(s); lower batch_size"
        )
    total_steps = cfg.epochs * steps_per_epoch

    # AdamW; like open_clip, no weight decay on gains, biases, norms and the logit scale/bias.
    o = cfg.optim
    optimizer = make_adamw(model, cfg.lr, o.weight_decay, betas=(o.beta1, o.beta2), eps=o.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")

    # Resume: weights, optimizer, scaler, RNG and the step/epoch counters.
    start_epoch, step = 0, 0
    found = checkpoint_paths(out) if cfg.resume else []
    if found:
        state = torch.load(found[-1], map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = state["epoch"], state["step"]
        print(f"resuming from {found[-1]} (epoch {start_epoch}, step {step})")

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"train {cfg.model} ({n_params / 1e6:.2f}M params) loss={cfg.loss} on {device}: "
        f"{dataset.num_rows} pairs in {len(dataset.files)} shard(s), "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs -> {out}"
    )

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        dataset.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            drop_last=True,
            collate_fn=dataset.collate,
            pin_memory=device.type == "cuda",
        )
        sums: dict[str, torch.Tensor] = {}
        seen, t_epoch, t_log, seen_log = 0, time.perf_counter(), time.perf_counter(), 0
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="step",
            disable=not cfg.progress,
        )
        for images, texts in bar:
            images = images.to(device, non_blocking=True)
            texts = texts.to(device, non_blocking=True)
            lr = lr_at(step, total_steps, cfg.lr, o.warmup_steps, o.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # forward (autocast on bf16/fp16), loss in fp32, backward, step
            with autocast_context(device, cfg.precision):
                feats = model(images, texts)
            parts = loss_fn(
                feats["image_features"].float(),
                feats["text_features"].float(),
                feats["logit_scale"].float(),
                feats.get("logit_bias"),
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts["loss"]).backward()
            if cfg.optim.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            if model.logit_scale.requires_grad:  # CLIP's clamp: tau no lower than 1/100
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
            step += 1

            # bookkeeping
            batch = images.shape[0]
            seen, seen_log = seen + batch, seen_log + batch
            for k, v in parts.items():  # summed on device: no per-step host sync on CUDA
                sums[k] = sums.get(k, 0.0) + v.detach() * batch
            if step % cfg.log_every == 0:
                values = {k: v.item() for k, v in parts.items()}
                now = time.perf_counter()
                rate = seen_log / (now - t_log)
                bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{rate:.0f}")
                append_metrics(
                    metrics_path,
                    {
                        "kind": "step",
                        "epoch": epoch + 1,
                        "step": step,
                        **values,
                        "lr": lr,
                        "logit_scale": model.logit_scale.exp().item(),
                        "samples_per_s": rate,
                    },
                )
                t_log, seen_log = now, 0
        bar.close()

        # end of epoch: one metrics line, one checkpoint
        seconds = time.perf_counter() - t_epoch
        epoch_record = {
            "kind": "epoch",
            "epoch": epoch + 1,
            "step": step,
            **{k: v.item() / max(seen, 1) for k, v in sums.items()},
            "logit_scale": model.logit_scale.exp().item(),
            "samples": seen,
            "seconds": seconds,
            "samples_per_s": seen / seconds,
        }
        append_metrics(metrics_path, epoch_record)
        save_training_state(
            out,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "step": step,
            },
            keep=cfg.keep_checkpoints,
        )
        if cfg.progress:
            print(
                f"epoch {epoch + 1}: loss {epoch_record['loss']:.4f}, "
                f"{epoch_record['samples_per_s']:.0f} samples/s"
            )

    save_checkpoint(model, out / "model.safetensors")
    return out


# --- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_command(argv, "capgap train", __doc__, TrainConfig, "train")
    out = train(cfg)
    print(f"model: {out / 'model.safetensors'}")
    return 0
