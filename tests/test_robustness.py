"""Flip rates, perturbations and the post-hoc mean shift on constructed embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capgap.models import metrics, robustness
from capgap.models.robustness import MeanShift, Task


def test_flip_rate_and_predict():
    assert robustness.flip_rate([0, 1, 2, 3], [0, 1, 0, 0]) == pytest.approx(0.5)
    assert robustness.flip_rate(np.arange(5), np.arange(5)) == 0.0
    gallery = np.eye(3)
    queries = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    assert robustness.predict(queries, gallery).tolist() == [0, 2]
    with pytest.raises(ValueError):
        robustness.flip_rate([0, 1], [0])


def test_gaussian_flip_rate_matches_the_normal_tail():
    # Two gallery items e0, e1; every query at angle theta from e0 in their plane.
    # The prediction flips when the noise projected on (e0 - e1) -- std sigma/sqrt(D)*sqrt(2)
    # -- exceeds the margin m = cos(theta) - sin(theta); renormalising cannot change an argmax.
    dim, n, theta = 16, 20000, math.radians(40)
    gallery = np.eye(dim)[:2]
    query = np.zeros((n, dim))
    query[:, 0], query[:, 1] = math.cos(theta), math.sin(theta)
    clean = robustness.predict(query, gallery)
    assert (clean == 0).all()
    margin = math.cos(theta) - math.sin(theta)
    for sigma in (0.2, 0.5, 1.0):
        noisy = robustness.gaussian_perturb(query, sigma, np.random.default_rng(0))
        expected = 0.5 * math.erfc(margin / (sigma / math.sqrt(dim) * math.sqrt(2)) / math.sqrt(2))
        measured = robustness.flip_rate(clean, robustness.predict(noisy, gallery))
        assert measured == pytest.approx(expected, abs=0.012), sigma
    assert np.allclose(np.linalg.norm(noisy, axis=1), 1.0)


def test_gaussian_is_seeded():
    e = np.random.default_rng(0).normal(size=(10, 8))
    a = robustness.gaussian_perturb(e, 0.3, np.random.default_rng(5))
    b = robustness.gaussian_perturb(e, 0.3, np.random.default_rng(5))
    assert np.array_equal(a, b)
    assert np.allclose(
        robustness.gaussian_perturb(e, 0.0, np.random.default_rng(1)), metrics.l2_normalize(e)
    )


def test_quantize_by_hand():
    lo, hi = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    # 1 bit: codes round((v + 1) / 2) -> 0.6 -> 1, 0.8 -> 1: (1, 1) renormalised
    out = robustness.quantize(np.array([[0.6, 0.8]]), 1, lo, hi)
    assert np.allclose(out, [[1 / math.sqrt(2), 1 / math.sqrt(2)]])
    # 2 bits: levels -1, -1/3, 1/3, 1 -> 0.6 -> 1/3, 0.8 -> 1
    out = robustness.quantize(np.array([[0.6, 0.8]]), 2, lo, hi)
    assert np.allclose(out, metrics.l2_normalize(np.array([[1 / 3, 1.0]])))
    e = metrics.l2_normalize(np.random.default_rng(0).normal(size=(50, 16)))
    lo, hi = robustness.fit_quantizer(e)
    assert np.abs(robustness.quantize(e, 16, lo, hi) - e).max() < 1e-3
    assert np.abs(robustness.quantize(e, 8, lo, hi) - e).max() < 0.02
    assert np.abs(robustness.quantize(e, 2, lo, hi) - e).max() > 0.05


def _orthogonal_gap_world(n=600, dim=32, classes=8, c=0.8, spread=0.9, seed=0):
    """Images s*u_i + c*e0, captions s*u_i - c*e0, class prompts s*p_k - c*e0, u, p ⟂ e0."""
    rng = np.random.default_rng(seed)
    s = math.sqrt(1 - c * c)
    protos = metrics.l2_normalize(rng.normal(size=(classes, dim - 1)))
    labels = rng.integers(classes, size=n)
    content = metrics.l2_normalize(protos[labels] + spread * rng.normal(size=(n, dim - 1)) / 4)

    def embed(rows, sign):
        return np.concatenate([np.full((len(rows), 1), sign * c), s * rows], axis=1)

    return embed(content, 1.0), embed(content, -1.0), embed(protos, -1.0), labels


def test_mean_shift_removes_gap_and_keeps_predictions():
    img, txt, prompts, labels = _orthogonal_gap_world()
    assert metrics.l2m(img, txt) == pytest.approx(1.6)
    shift = MeanShift.fit(img, txt)
    img2, txt2 = shift.apply(img, "image"), shift.apply(txt, "text")
    assert metrics.l2m(img2, txt2) == pytest.approx(0.0, abs=1e-9)
    assert np.allclose(np.linalg.norm(img2, axis=1), 1.0)
    before = robustness.predict(img, prompts)
    after = robustness.predict(img2, shift.apply(prompts, "text"))
    assert np.array_equal(before, after)  # clean accuracy unchanged, prediction by prediction
    assert (before == labels).mean() > 0.5


def test_mean_shift_lowers_flip_rate_for_an_orthogonal_gap():
    img, txt, prompts, labels = _orthogonal_gap_world(spread=2.0)
    sigmas = (0.2, 0.4, 0.6, 0.8)
    task = Task("zs", img, prompts, "image", labels)
    out = robustness.robustness_metrics([task], img, txt, sigmas=sigmas, n_trials=2, seed=0)
    assert out["zs_clean_acc"] == out["shift_zs_clean_acc"]
    assert out["shift_l2m"] == pytest.approx(0.0, abs=1e-9)
    in_range = [s for s in sigmas if 0.05 <= out[f"zs_flip_noise{s:g}"] <= 0.5]
    assert len(in_range) >= 2, out
    for s in in_range:
        assert out[f"shift_zs_flip_noise{s:g}"] < out[f"zs_flip_noise{s:g}"], s
    assert out["shift_zs_flip_int4"] <= out["zs_flip_int4"]


def test_pure_translation_does_not_change_flips_for_an_orthogonal_gap():
    # Moving the images onto the caption mean keeps their norm and every score difference,
    # so with the same noise draws the predictions are identical: the gain comes from
    # taking the gap component out and renormalising (the "project" mode).
    img, txt, prompts, labels = _orthogonal_gap_world()
    task = Task("zs", img, prompts, "image", labels)
    out = robustness.robustness_metrics(
        [task], img, txt, sigmas=(0.3,), bits=(), n_trials=2, mode="translate"
    )
    assert out["shift_l2m"] == pytest.approx(0.0, abs=1e-9)
    assert out["shift_zs_flip_noise0.3"] == pytest.approx(out["zs_flip_noise0.3"])


def test_mean_shift_text_side_and_validation():
    img, txt, _, _ = _orthogonal_gap_world(n=100)
    shift = MeanShift.fit(img, txt, moved="text")
    assert metrics.l2m(shift.apply(img, "image"), shift.apply(txt, "text")) < 1e-9
    with pytest.raises(ValueError):
        MeanShift.fit(img, txt, moved="audio")
    with pytest.raises(ValueError):
        MeanShift.fit(img, txt, mode="rotate")


def test_task_robustness_keys_and_retrieval():
    img, txt, _, _ = _orthogonal_gap_world(n=120)
    task = Task("i2t", img, txt, "image", np.arange(len(img)))
    refs = {"image": img, "text": txt}
    out = robustness.task_robustness(task, refs, sigmas=(0.1,), bits=(8,), perturb="both")
    assert set(out) == {"i2t_clean_acc", "i2t_flip_noise0.1", "i2t_acc_noise0.1", "i2t_flip_int8"}
    assert out["i2t_clean_acc"] == pytest.approx(
        metrics.retrieval_recall(img, txt, (1,))["i2t_r@1"]
    )
