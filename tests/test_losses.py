"""Losses match their written formulas on small fixed tensors, and gradients reach both towers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capgap.models.clip_factory import create_clip
from capgap.models.losses import (
    ClipLoss,
    CuaLoss,
    SigLipLoss,
    alignment,
    build_loss,
    cross_uniformity,
    uniformity,
)


def _features(n: int = 5, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def _dot(a, b) -> float:
    return sum(float(p) * float(q) for p, q in zip(a, b, strict=True))


def _sq(a, b) -> float:
    return sum((float(p) - float(q)) ** 2 for p, q in zip(a, b, strict=True))


def _log_mean_exp(values: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in values) / len(values))


def _clip_reference(x, y, s: float) -> float:
    n = len(x)
    total = 0.0
    for i in range(n):
        row = [s * _dot(x[i], y[j]) for j in range(n)]
        col = [s * _dot(x[j], y[i]) for j in range(n)]
        total -= row[i] - math.log(sum(math.exp(v) for v in row))
        total -= col[i] - math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def test_clip_matches_formula():
    x, y = _features()
    out = ClipLoss()(x, y, torch.tensor(10.0, dtype=torch.float64))
    assert set(out) == {"contrastive", "loss"}
    assert out["loss"].item() == pytest.approx(_clip_reference(x, y, 10.0), rel=1e-9)


def test_fixed_temperature_overrides_logit_scale():
    x, y = _features()
    out = ClipLoss(temperature=0.5)(x, y, torch.tensor(100.0, dtype=torch.float64))
    assert out["loss"].item() == pytest.approx(_clip_reference(x, y, 2.0), rel=1e-9)


def test_siglip_matches_formula():
    x, y = _features()
    s, b = 10.0, -10.0
    expected = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            z = 1.0 if i == j else -1.0
            logit = s * _dot(x[i], y[j]) + b
            expected -= math.log(1 / (1 + math.exp(-z * logit)))
    expected /= len(x)
    out = SigLipLoss()(
        x, y, torch.tensor(s, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    )
    assert out["loss"].item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(x, y, torch.tensor(s))


def test_uniformity_alignment_cross_uniformity_match_formulas():
    x, y = _features(n=6, d=3, seed=1)
    n = len(x)
    ux = _log_mean_exp([-2 * _sq(x[i], x[j]) for i in range(n) for j in range(i + 1, n)])
    uy = _log_mean_exp([-2 * _sq(y[i], y[j]) for i in range(n) for j in range(i + 1, n)])
    xu = _log_mean_exp([-2 * _sq(x[i], y[j]) for i in range(n) for j in range(n) if i != j])
    al = sum(_sq(x[i], y[i]) for i in range(n)) / n
    assert uniformity(x).item() == pytest.approx(ux, rel=1e-9)
    assert uniformity(y).item() == pytest.approx(uy, rel=1e-9)
    assert cross_uniformity(x, y).item() == pytest.approx(xu, rel=1e-9)
    assert alignment(x, y).item() == pytest.approx(al, rel=1e-9)

    s = torch.tensor(1 / 0.01, dtype=torch.float64)
    clip = _clip_reference(x, y, 100.0)
    cua = CuaLoss()(x, y, s)
    assert set(cua) == {"contrastive", "uniform", "align", "loss"}
    assert cua["uniform"].item() == pytest.approx(0.5 * ux + 0.5 * uy, rel=1e-9)
    assert cua["loss"].item() == pytest.approx(clip + 0.5 * ux + 0.5 * uy + al, rel=1e-9)
    cuaxu = CuaLoss(cross_uniform=True, uniform_weight=2.0, align_weight=0.5, xuniform_weight=3.0)(
        x, y, s
    )
    expected = clip + 2.0 * (0.5 * ux + 0.5 * uy) + 0.5 * al + 3.0 * xu
    assert cuaxu["xuniform"].item() == pytest.approx(xu, rel=1e-9)
    assert cuaxu["loss"].item() == pytest.approx(expected, rel=1e-9)


def test_perfectly_aligned_pairs_have_zero_alignment_and_finite_uniformity():
    x, _ = _features(n=4, d=4)
    assert alignment(x, x).item() == pytest.approx(0.0, abs=1e-12)
    same = x[:1].repeat(4, 1)  # all identical: exp(0) = 1 everywhere, log mean = 0
    assert uniformity(same).item() == pytest.approx(0.0, abs=1e-6)


def test_build_loss_names():
    assert isinstance(build_loss("clip"), ClipLoss)
    assert isinstance(build_loss("siglip"), SigLipLoss)
    assert build_loss("cuaxu").cross_uniform and not build_loss("cua").cross_uniform
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("triplet")


@pytest.mark.parametrize("name", ["clip", "siglip", "cua", "cuaxu"])
def test_gradients_reach_both_encoders(name):
    torch.manual_seed(0)
    model, _, _ = create_clip("capgap-micro-vit", init_logit_bias=-10.0)
    images = torch.randn(4, 3, 32, 32)
    texts = torch.randint(1, 1000, (4, 20))
    out = model(images, texts)
    img, txt, scale = out[:3]
    bias = out[3] if len(out) > 3 else None
    build_loss(name)(img, txt, scale, bias)["loss"].backward()
    for tower, module in (("image", model.visual), ("text", model.transformer)):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), f"{tower} tower has params without grad"
        assert sum(g.abs().sum().item() for g in grads) > 0, (
            f"no gradient reached the {tower} tower"
        )
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
