"""A causal text tower's batch run in groups of similar caption length.

A CLIP text tower (causal mask, pooled at each row's end-of-text token) gives every row
the same features whatever follows that token, so a batch need not run to its longest
caption: :func:`length_groups` splits it where the padding saved pays for another forward
pass, and :func:`encode_in_length_groups` runs each group cut to its longest row and puts
the rows back in order. The ViT-B/32 text tower, batches of 64 on a 2-core CPU
(``benchmarks/text_groups.py``): 1.26x one pass per batch cut to its longest caption on
synth's web captions (4-16 tokens), 5.27x when every 10th caption is long (one long
caption made the whole batch run to it); features within 3.8e-6 of the padded pass.

    lengths = (tokens.argmax(dim=-1) + 1).tolist()        # positions each row uses
    feats = encode_in_length_groups(encode, tokens, lengths, group_overhead(512, "cpu"))

Used by :class:`capgap.models.text_trim.TrimmedTextCLIP` (open_clip) and
:class:`capgap.models.hf_clip.HFDualEncoder` (transformers CLIP).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch


def group_overhead(width: int, device: torch.device | str) -> int:
    """What one more text forward pass costs, in token positions (rows x positions) of a
    tower ``width`` wide: the price :func:`length_groups` weighs saved padding against.

    A pass's fixed cost (per-op dispatch, small-GEMM inefficiency) grows with the layers as
    a position's cost does, but a position's cost also grows with width squared, hence
    ``2**24 / width**2``: 64 at ViT-B/32's 512, the best of 0 / 16 / 64 / 128 / 256 on a
    2-core AVX-512 CPU (1,024 synthetic alt-texts of 4-16 tokens, batches of 64: 16 3%
    slower, 128 10%, 0 and 256 32%), ~1,800 at the micro models' 96 (their batches stay
    whole). On an accelerator a pass's launches cost far more than its positions, so 64x
    as much: an estimate, not measured (no GPU lent yet); ``benchmarks/gpu_check.py``'s
    ``text_groups`` section shows whether groups beat one pass there.
    """
    per_pass = max(16, 2**24 // max(1, width) ** 2)
    return per_pass if torch.device(device).type == "cpu" else 64 * per_pass


def length_groups(lengths: list[int], overhead: float) -> list[list[int]]:
    """Row indices grouped by length: each group is run padded to its longest row.

    Minimises ``sum(rows x longest) + overhead x groups`` over groups of consecutive
    lengths (exact, by dynamic programming over the distinct lengths: at most the context
    length, whatever the batch size). One group when splitting saves less than a pass.
    """
    if not lengths:
        return []
    values = sorted(Counter(lengths).items())
    ends = [0]  # ends[j]: rows with one of the j shortest distinct lengths
    for _, count in values:
        ends.append(ends[-1] + count)
    cost = [0.0] + [float("inf")] * len(values)
    start = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        for i in range(j):
            c = cost[i] + (ends[j] - ends[i]) * values[j - 1][0] + overhead
            if c < cost[j]:
                cost[j], start[j] = c, i
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups, j = [], len(values)
    while j:
        groups.append(order[ends[start[j]] : ends[j]])
        j = start[j]
    return groups[::-1]


def encode_in_length_groups(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    lengths: list[int],
    overhead: float,
) -> torch.Tensor:
    """``encode`` (token ids cut to their used positions -> features) over ``tokens`` in
    :func:`length_groups`, each group cut to its longest ``lengths``; rows in input order.
    Differentiable (a concatenation and a gather), so training uses it as scoring does."""
    groups = length_groups(lengths, overhead)
    if len(groups) <= 1:
        return encode(tokens[:, : max(lengths, default=tokens.shape[-1])])
    outs = [encode(tokens[g][:, : max(lengths[i] for i in g)]) for g in groups]
    order = torch.tensor([i for g in groups for i in g], device=tokens.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=tokens.device)
    return torch.cat(outs)[inverse]
