"""A text batch in groups of similar caption length: the grouping is optimal, the features
and gradients are those of one full-length pass, and both scorers (open_clip, transformers)
use it.

    .venv/bin/python -m pytest -q tests/test_text_groups.py
"""

from __future__ import annotations

import random

import open_clip
import pytest
import torch

from capgap.models import hf_clip, text_trim
from capgap.models.clip_factory import create_clip
from capgap.models.text_groups import encode_in_length_groups, group_overhead, length_groups

CAPTIONS = [
    "a star",
    "a small red star on a blue background in the upper left corner of the picture",
    "a red star",
    "a square",
    "a large dotted green circle near the bottom edge",
    "a circle",
]


def cost(lengths: list[int], groups: list[list[int]], overhead: float) -> float:
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield partition[:k] + [[first, *partition[k]]] + partition[k + 1 :]


@pytest.mark.parametrize("seed", range(30))
def test_length_groups_is_the_cheapest_of_all_partitions(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 7))]
    overhead = rng.choice([0, 1, 3, 8, 20, 100])
    groups = length_groups(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    best = min(cost(lengths, p, overhead) for p in set_partitions(list(range(len(lengths)))))
    assert cost(lengths, groups, overhead) == best


def test_length_groups_extremes():
    lengths = [5, 77, 5, 6, 77, 5]
    assert [sorted(g) for g in length_groups(lengths, 10**6)] == [list(range(6))]  # one pass
    assert [sorted(lengths[i] for i in g) for g in length_groups(lengths, 0)] == [
        [5, 5, 5],
        [6],
        [77, 77],
    ]
    assert length_groups([], 0) == []
    # Many rows, few distinct lengths: the work is over the lengths, not the rows.
    many = [4] * 5000 + [70] * 3
    assert [len(g) for g in length_groups(many, 64)] == [5000, 3]


def test_group_overhead_scales_with_width_and_device():
    assert group_overhead(512, "cpu") == 64
    assert group_overhead(96, "cpu") == 2**24 // 96**2
    assert group_overhead(4096, "cpu") == 16
    assert group_overhead(512, "cuda") == 64 * 64


def _grads(model, encode, tokens):
    model.zero_grad()
    encode(tokens).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grouped_features_and_gradients_equal_one_full_pass():
    torch.manual_seed(0)
    model, _, tokenizer = create_clip("capgap-micro-vit")
    tokens = tokenizer(CAPTIONS)
    lengths = (tokens.argmax(dim=-1) + 1).tolist()
    assert len(length_groups(lengths, 0)) > 2

    def grouped(t: torch.Tensor) -> torch.Tensor:
        used = (t.argmax(dim=-1) + 1).tolist()
        return encode_in_length_groups(model._encode_positions, t, used, 0)

    full = open_clip.CLIP.encode_text(model, tokens)
    torch.testing.assert_close(grouped(tokens), full, rtol=1e-5, atol=1e-5)
    rows = [3, 1, 5, 0, 2, 4]  # rows come back in input order
    torch.testing.assert_close(grouped(tokens[rows]), full[rows], rtol=1e-5, atol=1e-5)
    ours = _grads(model, grouped, tokens)
    theirs = _grads(model, lambda t: open_clip.CLIP.encode_text(model, t), tokens)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-4)


def _passes(module: torch.nn.Module) -> list[int]:
    """Sequence lengths of each forward pass through ``module``, appended as they run."""
    seen: list[int] = []
    module.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    return seen


def test_open_clip_encode_text_runs_groups_when_they_pay(monkeypatch):
    torch.manual_seed(0)
    model, _, tokenizer = create_clip("capgap-micro-vit")
    model.eval()
    tokens = tokenizer(CAPTIONS)
    passes = _passes(model.token_embedding)
    with torch.no_grad():
        whole = model.encode_text(tokens, normalize=True)
        assert len(passes) == 1  # the micro model's width: one pass pays more than padding
        monkeypatch.setattr(text_trim, "group_overhead", lambda width, device: 0)
        grouped = model.encode_text(tokens, normalize=True)
    assert len(passes) == 1 + len({*(tokens.argmax(dim=-1) + 1).tolist()})
    assert sorted(passes[1:]) == sorted({*(tokens.argmax(dim=-1) + 1).tolist()})
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-5)


def test_hf_clip_encode_text_runs_groups_when_they_pay(tmp_path, monkeypatch):
    folder = hf_clip.build_random_hf_clip(tmp_path / "clip", "clip", seed=2)
    model, _, tokenizer = hf_clip.load_hf_clip(str(folder))
    ids = tokenizer(CAPTIONS)
    passes = _passes(model.hf.text_model.embeddings)
    with torch.no_grad():
        whole = model.encode_text(ids)
        full = model._text_features(ids)
        monkeypatch.setattr(hf_clip, "group_overhead", lambda width, device: 0)
        grouped = model.encode_text(ids)
    lengths = model.used_lengths(ids)
    assert passes[0] == max(lengths) < 77 and len(passes) == 2 + len(set(lengths))
    for features in (whole, grouped):
        torch.testing.assert_close(features, full, rtol=1e-5, atol=1e-5)


def test_set_partitions_enumerates_bell_numbers():  # the brute force above is complete
    assert [sum(1 for _ in set_partitions(list(range(n)))) for n in range(6)] == [
        1,
        1,
        2,
        5,
        15,
        52,
    ]
    assert all(
        sorted(i for g in p for i in g) == [0, 1, 2, 3] for p in set_partitions([0, 1, 2, 3])
    )
    assert len({tuple(map(tuple, p)) for p in set_partitions([0, 1, 2, 3])}) == 15
