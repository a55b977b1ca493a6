"""Contrastive losses for CLIP-style training: CLIP, SigLIP, CUA and CUAXU.

Every loss takes L2-normalised image features x (N, D), text features y (N, D) (row i of
each is a matched pair), the exponentiated logit scale s = 1/tau that open_clip models
return, and for SigLIP the logit bias b. Each returns a dict of named parts plus
``"loss"``, the total to back-propagate, so the trainer can log every part.
Single process: no all-gather across devices (the batch is the set of negatives).

    loss_fn = build_loss("cua")
    out = loss_fn(image_features, text_features, logit_scale)
    out["loss"].backward()   # out also has "contrastive", "uniform", "align"
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["clip", "siglip", "cua", "cuaxu"]


def _scale(logit_scale: torch.Tensor | float, temperature: float | None) -> torch.Tensor | float:
    """The logit scale to use: 1/temperature when the temperature is fixed, else the given one."""
    return 1.0 / temperature if temperature is not None else logit_scale


def clip_infonce(
    x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, "Learning Transferable Visual Models
    From Natural Language Supervision"; same as open_clip's ClipLoss on one device):

        logits_ij = s * <x_i, y_j>
        L = ( CE(logits, i -> i) + CE(logits^T, i -> i) ) / 2
          = -1/(2N) sum_i [ log softmax_j(logits_ij)[i] + log softmax_j(logits_ji)[i] ]
    """
    logits = logit_scale * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_sigmoid(
    x: torch.Tensor,
    y: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image
    Pre-Training"; same as open_clip's SigLipLoss on one device):

        z_ij = +1 if i == j else -1,   logits_ij = s * <x_i, y_j> + b
        L = -1/N sum_{i,j} log sigmoid(z_ij * logits_ij)
    """
    logits = logit_scale * x @ y.T + logit_bias
    labels = 2 * torch.eye(x.shape[0], device=x.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for all i, j (N, M), clamped at 0 against rounding."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return sq.clamp_min(0)


def uniformity(a: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Uniformity of Wang & Isola 2020 ("Understanding Contrastive Representation Learning
    through Alignment and Uniformity on the Hypersphere"), t = 2:

        U(a) = log mean_{i<j} exp(-t ||a_i - a_j||^2)
    """
    n = a.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=a.device)
    sq = _squared_distances(a, a)[i, j]
    # log mean exp, computed stably as logsumexp - log(count)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Alignment of Wang & Isola 2020, alpha = 2:  A = mean_i ||x_i - y_i||_2^alpha."""
    return (x - y).norm(dim=1).pow(alpha).mean()


def cross_uniformity(x: torch.Tensor, y: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Cross-modal uniformity of Fahim et al. ("It's Not a Modality Gap: Characterizing and
    Addressing the Contrastive Gap"):

        XU = log mean_{i != j} exp(-t ||x_i - y_j||^2)
    """
    n = x.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
    sq = _squared_distances(x, y)[off_diagonal]
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


class ClipLoss(nn.Module):
    """CLIP InfoNCE. ``temperature`` fixes tau (ignores the model's logit_scale) when set."""

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        s = _scale(logit_scale, self.temperature)
        contrastive = clip_infonce(image_features, text_features, s)
        return {"contrastive": contrastive, "loss": contrastive}


class SigLipLoss(nn.Module):
    """SigLIP sigmoid loss; needs the model's ``logit_bias`` (SigLIP init: s = 10, b = -10)."""

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            raise ValueError(
                "the SigLIP loss needs a logit_bias (build the model with init_logit_bias)"
            )
        s = _scale(logit_scale, self.temperature)
        contrastive = siglip_sigmoid(image_features, text_features, s, logit_bias)
        return {"contrastive": contrastive, "loss": contrastive}


class CuaLoss(nn.Module):
    """CUA and CUAXU of Fahim et al. (2024), "It's Not a Modality Gap: Characterizing and
    Addressing the Contrastive Gap":

        L_uniform  = 0.5 * U(x) + 0.5 * U(y)                     (t = 2)
        L_align    = mean_i ||x_i - y_i||^2                      (alpha = 2)
        L_xuniform = log mean_{i != j} exp(-2 ||x_i - y_j||^2)
        L_CUA      = L_CLIP + w_u * L_uniform + w_a * L_align
        L_CUAXU    = L_CUA + w_xu * L_xuniform

    Weights default to 1 as in the paper; they ran at a fixed temperature of 0.01.
    ``cross_uniform=False`` gives CUA, ``True`` gives CUAXU.
    """

    def __init__(
        self,
        cross_uniform: bool = False,
        uniform_weight: float = 1.0,
        align_weight: float = 1.0,
        xuniform_weight: float = 1.0,
        temperature: float | None = None,
    ) -> None:
        super().__init__()
        self.cross_uniform = cross_uniform
        self.uniform_weight = uniform_weight
        self.align_weight = align_weight
        self.xuniform_weight = xuniform_weight
        self.temperature = temperature

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        x, y = image_features, text_features
        s = _scale(logit_scale, self.temperature)
        parts = {
            "contrastive": clip_infonce(x, y, s),
            "uniform": 0.5 * uniformity(x) + 0.5 * uniformity(y),
            "align": alignment(x, y),
        }
        total = (
            parts["contrastive"]
            + self.uniform_weight * parts["uniform"]
            + self.align_weight * parts["align"]
        )
        if self.cross_uniform:
            parts["xuniform"] = cross_uniformity(x, y)
            total = total + self.xuniform_weight * parts["xuniform"]
        return {**parts, "loss": total}


def build_loss(
    name: LossName,
    temperature: float | None = None,
    uniform_weight: float = 1.0,
    align_weight: float = 1.0,
    xuniform_weight: float = 1.0,
) -> nn.Module:
    """The loss module for ``name``: clip | siglip | cua | cuaxu."""
    if name == "clip":
        return ClipLoss(temperature)
    if name == "siglip":
        return SigLipLoss(temperature)
    if name in ("cua", "cuaxu"):
        return CuaLoss(
            cross_uniform=name == "cuaxu",
            uniform_weight=uniform_weight,
            align_weight=align_weight,
            xuniform_weight=xuniform_weight,
            temperature=temperature,
        )
    raise ValueError(f"unknown loss {name!r}: expected clip, siglip, cua or cuaxu")
