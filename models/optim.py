"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule.

Both trainers (``capgap train`` for CLIP, ``capgap train-captioner``) build their
optimiser and schedule here. The defaults are the CLIP trainer's rules (open_clip's):
no weight decay on tensors of fewer than 2 dimensions nor on parameters whose name
contains ``bn``, ``ln``, ``bias`` or ``logit_``; frozen parameters left out; the
warmup shortened to leave at least one cosine step. The captioner passes its own
(``no_decay_keys=("norm", "ln_")``, ``eps=1e-8``, ``clamp_warmup=False``).

    optimizer = make_adamw(model, lr=1e-3, weight_decay=0.1, eps=1e-6)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total_steps, 1e-3, warmup_steps=50)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CLIP_NO_DECAY_KEYS: tuple[str, ...] = ("bn", "ln", "bias", "logit_")


def decays(
    name: str, param: torch.Tensor, no_decay_keys: Sequence[str] = CLIP_NO_DECAY_KEYS
) -> bool:
    """Whether ``param`` gets weight decay: 2-D or more, and no ``no_decay_keys`` in its name."""
    return not (param.ndim < 2 or any(key in name for key in no_decay_keys))


def make_adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    no_decay_keys: Sequence[str] = CLIP_NO_DECAY_KEYS,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` in two groups.

    Group 0 (weight decay 0): tensors with ``ndim < 2`` (gains, biases, norms, scalars)
    and parameters whose name contains any of ``no_decay_keys``; group 1: the rest, with
    ``weight_decay``. Parameters with ``requires_grad=False`` are left out. The fused kernel
    is used where torch has one for the parameters' device (``fused_supported``).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decays(name, param, no_decay_keys) else no_decay).append(param)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, fused=fused_supported(decay + no_decay)
    )


def fused_supported(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes ``params``: floating point, on CPU or CUDA.

    The default (per-tensor) AdamW spends about a fifth of a micro CLIP's CPU training step
    in the update of its 49,408 x 96 token embedding; the fused kernel does the same update
    (to float rounding) in one pass, 5x faster there (benchmarks/train_throughput.py).
    """
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def lr_at(
    step: int,
    total_steps: int,
    lr: float,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    clamp_warmup: bool = True,
) -> float:
    """Learning rate of ``step`` (0-based): linear warmup to ``lr``, then cosine decay.

    Warmup: ``lr * (step + 1) / warmup`` for ``step < warmup``, so step 0 already moves.
    Then a half cosine from ``lr`` down to ``lr * min_lr_ratio``, reached at
    ``total_steps`` and held after it. With ``clamp_warmup`` the warmup is cut to
    ``total_steps - 1`` steps so that a short run still decays; without it a warmup
    longer than the run never ends.
    """
    warmup = min(warmup_steps, max(total_steps - 1, 0)) if clamp_warmup else warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
