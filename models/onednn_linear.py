"""A model's float32 linear layers run through oneDNN on the CPU, for inference.

torch's float32 matrix product on the CPU (``aten::addmm``) calls MKL's sgemm, whose code
paths for non-Intel CPUs are known to lag its Intel ones; oneDNN, which torch bundles, picks
its kernels by instruction set alone. On a 2-core AMD EPYC VM (AVX-512, torch 2.14.1, MKL
2024.2, oneDNN 3.12; ``benchmarks/onednn_linear.py``, 2026-12-08) a ViT-B/32 MLP's product
(3,200 x 768 @ 768 x 3,072) ran at 184 GFLOP/s through MKL and 398 through oneDNN, and
ViT-B/32's two towers (open_clip, batches of 64) took 60.0 ms a pair with torch's layers and
30.0 with these (transformers' CLIP 62.7 and 33.0), features within 7e-6 of each other
(float32 rounding: the same sums in another order).

    n = use_onednn_linears(model)   # layers routed; the model's state_dict is unchanged

Each ``nn.Linear`` (the exact class, not a subclass someone else wrote) becomes a
:class:`OneDNNLinear` and each ``nn.MultiheadAttention`` a :class:`OneDNNMultiheadAttention`
(open_clip's attention: its input projection is a bare parameter, not an ``nn.Linear``) by
changing the instance's class: the same parameters, hooks and state_dict keys. Both fall back
to torch's own forward whenever their fast path does not apply: autograd needs the result,
the input is not float32 on the CPU, the product is too small to pay oneDNN's per-call cost
(:data:`MIN_MULTIPLY_ADDS`), or (attention) anything but batch-first self-attention
without attention weights returned. So a routed model still trains, only slower than nothing.

:func:`onednn_linear_available` says whether this torch can do it here (it checks the op
exists and agrees with ``torch.nn.functional.linear`` on a small product); ``auto`` in
:func:`wants_onednn` uses oneDNN on x86-64 only, the instruction sets it was measured on.
"""

from __future__ import annotations

import functools
import platform
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

#: ``model.cpu_matmul``: ``auto`` (oneDNN on x86-64 when available), ``onednn`` (required:
#: an error when this torch cannot), ``torch`` (torch's own layers).
CpuMatmul = Literal["auto", "onednn", "torch"]


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's linear op on the CPU and it computes a linear layer."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(5, 7, 33, generator=generator)
        weight = torch.randn(17, 33, generator=generator)
        bias = torch.randn(17, generator=generator)
        with torch.no_grad():
            got = linear(x, weight, bias)
        return bool(torch.allclose(got, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4))
    except (AttributeError, RuntimeError):  # op missing from this build, or not for this CPU
        return False


def wants_onednn(choice: CpuMatmul) -> bool:
    """Whether a CPU float32 model should be routed through oneDNN for ``model.cpu_matmul``.

    Raises ``RuntimeError`` for ``onednn`` when this torch cannot (rather than running slower
    than asked without a word).
    """
    if choice == "torch":
        return False
    if choice == "onednn":
        if not onednn_linear_available():
            raise RuntimeError(
                "model.cpu_matmul=onednn, but this torch build has no working oneDNN linear "
                "(torch.ops.mkldnn._linear_pointwise) on this CPU; use auto or torch"
            )
        return True
    if choice != "auto":
        raise ValueError(f"model.cpu_matmul must be auto, onednn or torch, not {choice!r}")
    return platform.machine().lower() in {"x86_64", "amd64"} and onednn_linear_available()


#: Multiply-adds below which a product stays torch's: a oneDNN call costs ~25 us more than
#: MKL's before any arithmetic (2 threads, 2-core AMD EPYC: 96 -> 384 wide at 64 rows,
#: 2.4M multiply-adds, took the same time both ways; at 32 rows torch's was 1.4x faster,
#: at 512 rows oneDNN's 1.7x), so one small caption or a micro model's single image
#: runs faster without it.
MIN_MULTIPLY_ADDS = 1 << 21


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return (
        not needs_grad
        and x.numel() * weight.shape[0] >= MIN_MULTIPLY_ADDS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` computed by oneDNN (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose inference-time float32 CPU product runs through oneDNN."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _onednn_applies(input, self.weight):
            return linear(input, self.weight, self.bias)
        return super().forward(input)


class OneDNNMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inference-time self-attention (batch first, no weights
    returned, an additive float mask or none) runs its projections through oneDNN and the
    attention through ``scaled_dot_product_attention``; anything else goes to torch's own."""

    def _fast_path_applies(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> bool:
        if not (query is key and key is value and query.dim() == 3):
            return False
        if need_weights or is_causal or key_padding_mask is not None:
            return False
        if not (self.batch_first and self._qkv_same_embed_dim and self.in_proj_bias is not None):
            return False
        if self.bias_k is not None or self.add_zero_attn or (self.training and self.dropout):
            return False
        if attn_mask is not None:
            length = query.shape[1]
            shapes = {(length, length), (query.shape[0] * self.num_heads, length, length)}
            if attn_mask.dtype != query.dtype or tuple(attn_mask.shape) not in shapes:
                return False  # a boolean mask means the opposite in SDPA; leave it to torch
        return _onednn_applies(query, self.in_proj_weight)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self._fast_path_applies(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        ):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        batch, length, width = query.shape
        heads = self.num_heads
        qkv = linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, length, length)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return linear(out, self.out_proj.weight, self.out_proj.bias), None


def use_onednn_linears(model: nn.Module) -> int:
    """Route ``model``'s ``nn.Linear`` and ``nn.MultiheadAttention`` layers through oneDNN (in
    place); returns how many were routed. The caller decides whether to (:func:`wants_onednn`).
    """
    routed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            routed += 1
        elif type(module) is nn.MultiheadAttention:
            # Its out_proj stays torch's: the fallback path reads it as a bare weight.
            module.__class__ = OneDNNMultiheadAttention
            routed += 1
    return routed
