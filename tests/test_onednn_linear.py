"""Linear layers routed through oneDNN: the same outputs as torch's layers (float32 rounding),
torch's own path whenever autograd or an unusual call needs it, and the scorer routes only
where ``model.cpu_matmul`` says.

    .venv/bin/python -m pytest -q tests/test_onednn_linear.py
"""

from __future__ import annotations

import copy
import platform

import numpy as np
import pytest
import torch
from torch import nn

from capgap.models import hf_clip, onednn_linear
from capgap.models.clip_factory import create_clip
from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig
from capgap.models.onednn_linear import (
    OneDNNLinear,
    OneDNNMultiheadAttention,
    onednn_linear_available,
    use_onednn_linears,
    wants_onednn,
)

pytestmark = pytest.mark.skipif(
    not onednn_linear_available(), reason="this torch build has no oneDNN linear on this CPU"
)


@pytest.fixture
def onednn_calls(monkeypatch):
    """The products that went through oneDNN since the test began (every product big enough
    to: these tests' layers are far smaller than a real tower's)."""
    monkeypatch.setattr(onednn_linear, "MIN_MULTIPLY_ADDS", 0)
    calls = []
    real = onednn_linear.linear

    def counted(x, weight, bias):
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(onednn_linear, "linear", counted)
    return calls


def test_available_on_x86_torch_wheels():
    if platform.machine().lower() in {"x86_64", "amd64"}:
        assert onednn_linear_available() and wants_onednn("auto")
    assert not wants_onednn("torch") and wants_onednn("onednn")


def test_onednn_required_but_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(onednn_linear, "onednn_linear_available", lambda: False)
    with pytest.raises(RuntimeError, match="cpu_matmul=onednn"):
        wants_onednn("onednn")
    assert not wants_onednn("auto")
    with pytest.raises(ValueError, match="auto, onednn or torch"):
        wants_onednn("fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="auto, onednn or torch"):
        ClipModelConfig(cpu_matmul="mkl")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(5, 33), (3, 7, 33), (2, 3, 4, 33)])
def test_linear_matches_torch(shape, onednn_calls):
    torch.manual_seed(0)
    layer = nn.Linear(33, 17)
    routed = copy.deepcopy(layer)
    assert use_onednn_linears(routed) == 1 and type(routed) is OneDNNLinear
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(routed(x), layer(x), rtol=1e-5, atol=1e-5)
        # a transposed (non-contiguous) input too
        xt = torch.randn(33, 5).t()
        torch.testing.assert_close(routed(xt), layer(xt), rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 2


def test_small_products_stay_torchs(onednn_calls, monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_MULTIPLY_ADDS", 64 * 96 * 384)
    layer = nn.Linear(96, 384)
    use_onednn_linears(layer)
    with torch.no_grad():
        layer(torch.randn(63, 96))
        assert onednn_calls == []
        layer(torch.randn(2, 32, 96))
    assert onednn_calls == [(2, 32, 96)]


def test_threshold_keeps_a_micro_caption_on_torch_and_sends_a_vit_b_image_to_onednn():
    # 12 tokens through a micro model's 96 -> 384 MLP; 50 tokens through ViT-B/32's attention
    assert 12 * 96 * 384 < onednn_linear.MIN_MULTIPLY_ADDS <= 50 * 768 * 768


def test_linear_without_bias_and_the_fallbacks(onednn_calls):
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    routed = copy.deepcopy(layer)
    use_onednn_linears(routed)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(routed(x), layer(x), rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 1
    # autograd: torch's path, the same gradients
    routed(x).square().sum().backward()
    layer(x).square().sum().backward()
    torch.testing.assert_close(routed.weight.grad, layer.weight.grad)
    # float64, an empty batch and a 1-d input: torch's path
    with torch.no_grad():
        torch.testing.assert_close(routed.double()(x.double()), layer.double()(x.double()))
        assert routed(torch.empty(0, 8, dtype=torch.float64)).shape == (0, 4)
        assert routed(x[0].double()).shape == (4,)
    assert len(onednn_calls) == 1


def _attention(batch_first: bool = True) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    routed = copy.deepcopy(attn)
    assert use_onednn_linears(routed) == 1  # out_proj stays torch's (a subclass of Linear)
    assert type(routed) is OneDNNMultiheadAttention
    return attn, routed


def test_self_attention_matches_torch_with_and_without_masks(onednn_calls):
    attn, routed = _attention()
    x = torch.randn(3, 6, 16)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    per_head = torch.randn(3 * 4, 6, 6)
    with torch.no_grad():
        for mask in (None, causal, per_head):
            want = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
            got, weights = routed(x, x, x, need_weights=False, attn_mask=mask)
            assert weights is None
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == 3 * 2  # input and output projections, each call


def test_attention_cases_it_does_not_take_go_to_torch(onednn_calls):
    attn, routed = _attention()
    x, other = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    boolean = torch.ones(5, 5, dtype=torch.bool).triu(1)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad():
        for kwargs in (
            {"need_weights": True},
            {"need_weights": False, "attn_mask": boolean},
            {"need_weights": False, "key_padding_mask": padding},
        ):
            want = attn(x, x, x, **kwargs)
            got = routed(x, x, x, **kwargs)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            routed(x, other, other, need_weights=False)[0],
            attn(x, other, other, need_weights=False)[0],
        )
    seq_first, routed_seq_first = _attention(batch_first=False)
    with torch.no_grad():
        torch.testing.assert_close(
            routed_seq_first(x, x, x, need_weights=False)[0],
            seq_first(x, x, x, need_weights=False)[0],
        )
    assert onednn_calls == []
    # training with autograd: torch's path
    routed.train()
    routed(x, x, x, need_weights=False)[0].sum().backward()
    assert routed.in_proj_weight.grad is not None and onednn_calls == []


def test_subclasses_of_linear_are_left_alone():
    class LoRALinear(nn.Linear):
        pass

    model = nn.Sequential(LoRALinear(4, 4), nn.Linear(4, 4))
    assert use_onednn_linears(model) == 1
    assert type(model[0]) is LoRALinear and type(model[1]) is OneDNNLinear


def test_open_clip_towers_match_and_take_the_fast_path(onednn_calls):
    torch.manual_seed(0)
    model, _, tokenizer = create_clip("capgap-micro-vit")
    model.eval()
    keys = list(model.state_dict())
    routed = copy.deepcopy(model)
    layers = use_onednn_linears(routed)
    assert list(routed.state_dict()) == keys
    images = torch.randn(4, 3, 32, 32)
    tokens = tokenizer(["a red star", "a large dotted green circle near the bottom", "x", ""])
    with torch.no_grad():
        want = model.encode_image(images), model.encode_text(tokens)
        got = routed.encode_image(images), routed.encode_text(tokens)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # every routed layer ran oneDNN (attention: two products)
    n_attention = sum(type(m) is OneDNNMultiheadAttention for m in routed.modules())
    assert len(onednn_calls) == layers + n_attention


def test_hf_clip_towers_match(tmp_path, onednn_calls):
    folder = hf_clip.build_random_hf_clip(tmp_path / "clip", "clip", seed=2)
    model, _, tokenizer = hf_clip.load_hf_clip(str(folder))
    routed = copy.deepcopy(model)
    layers = use_onednn_linears(routed)
    assert layers > 0 and list(routed.state_dict()) == list(model.state_dict())
    images = torch.randn(3, 3, 32, 32)
    ids = tokenizer(["a red star", "a square", "a large dotted green circle"])
    with torch.no_grad():
        want = model.encode_image(images), model.encode_text(ids)
        got = routed.encode_image(images), routed.encode_text(ids)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert len(onednn_calls) == layers  # transformers' attention projections are nn.Linear


@pytest.mark.parametrize("choice", ["auto", "torch"])
def test_scorer_routes_as_configured(choice):
    embedder = ClipEmbedder(ClipModelConfig(cpu_matmul=choice))
    routed = any(type(m) is OneDNNLinear for m in embedder.model.modules())
    assert routed == (choice == "auto") and (embedder.onednn_layers > 0) == routed
    reference = ClipEmbedder(ClipModelConfig(cpu_matmul="torch"))
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    captions = ["a red star", "a square", "a circle near the edge"]
    got, want = embedder.embed(pixels, captions), reference.embed(pixels, captions)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_bf16_weights_are_not_routed():
    embedder = ClipEmbedder(ClipModelConfig(cpu_bf16=True))
    assert embedder.onednn_layers == 0
    assert not any(type(m) is OneDNNLinear for m in embedder.model.modules())
