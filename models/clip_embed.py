"""One batch of (image, caption) pairs through a CLIP model: the one place capgap encodes both.

``encode_pairs`` runs ``encode_image`` and ``encode_text`` (under ``autocast`` when given,
in inference mode), casts to float32 and, unless ``normalize=False``, L2-normalises each
row with ``F.normalize`` on the model's device. The curate scorer
(:class:`capgap.models.clip_handler.ClipEmbedder`), the recaption quality gate
(:mod:`capgap.models.recaption_handler`) and ``capgap eval`` call it; eval asks for the
raw float32 features and normalises all batches at once in float64
(``metrics.l2_normalize``), as it always has, so its numbers do not move.

    img, txt = encode_pairs(model, pixels, tokens, device)              # unit rows, on device
    img, txt = encode_pairs(model, pixels, tokens, device, normalize=False)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F


def encode_pairs(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    device: torch.device | str | None = None,
    *,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (image, text) embeddings of one batch, on ``device``; unit rows if ``normalize``.

    ``images`` are preprocessed pixels (N, 3, H, W), ``tokens`` the tokenizer's ids; both
    are moved to ``device`` (default: the model's). ``autocast`` is a context factory
    (e.g. ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``) wrapped around the two
    encoders only; the float32 cast and the normalisation run outside it.
    """
    if device is None:
        device = next(model.parameters()).device
    with torch.inference_mode():
        with autocast():
            img = model.encode_image(images.to(device, non_blocking=True))
            txt = model.encode_text(tokens.to(device, non_blocking=True))
        img, txt = img.float(), txt.float()
        if normalize:
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img, txt
