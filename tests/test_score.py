"""Scores, bank sampling, decision policy and the CLIP ModelHandler (tiny random-init model).

.venv/bin/python -m pytest -q tests/test_score.py
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from capgap.models.clip_handler import (
    PRECOMPUTED,
    ClipEmbedder,
    ClipModelConfig,
    ClipModelHandler,
    model_fingerprint,
)
from capgap.transforms.bank import SampleBank, make_bank, uid_hash
from capgap.transforms.decide import (
    DecideConfig,
    Rule,
    ScoreHistograms,
    bin_lower_edge,
    decide,
    histogram_quantile,
    resolve_thresholds,
    score_bin,
)
from capgap.transforms.embed import EmbedPairs, _EmbeddedRowFn
from capgap.transforms.reasons import Reason
from capgap.transforms.schema import ERRORS
from capgap.transforms.score import (
    CERTAINTY_METHODS,
    ScoreConfig,
    ScorePairs,
    batch_scores,
    pair_scores,
)


def unit(v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


# --- scores ----------------------------------------------------------------------------------


def test_uid_hash_is_stable_and_salted():
    assert uid_hash("a", "s") == uid_hash("a", "s")
    assert uid_hash("a", "s") != uid_hash("a", "t")
    assert 0 <= uid_hash("x\udcff", "s") < 2**64  # survives odd text


def _sims(s_self: float, bank_sims, tau: float, **cfg):
    """pair_scores with cos(image, text) = s_self and cos(bank_j, text) = bank_sims[j]."""
    text = np.array([1.0, 0.0])
    image = np.array([s_self, 0.0])
    bank = np.array([[v, 0.0] for v in bank_sims])
    cfg.setdefault("certainty", "margin")  # these need no bank captions
    return pair_scores(image, text, bank, tau, ScoreConfig(**cfg))


def test_certainty_rank_and_margin():
    bank = [0.1, 0.2, 0.3, 0.4]
    assert _sims(0.5, bank, 0.05, certainty="rank")["certainty"] == 1.0
    assert _sims(0.0, bank, 0.05, certainty="rank")["certainty"] == 0.0
    assert _sims(0.2, bank, 0.05, certainty="rank")["certainty"] == pytest.approx(0.375)
    margin = {"certainty": "margin", "margin_quantile": 1.0}
    assert _sims(0.5, bank, 0.05, **margin)["certainty"] == 1.0
    assert _sims(0.3, bank, 0.05, **margin)["certainty"] == pytest.approx(math.exp(-0.1 / 0.05))
    # nearest-rank quantile: 0.5 of four values is the second smallest
    half = {"certainty": "margin", "margin_quantile": 0.5}
    assert _sims(0.1, bank, 0.05, **half)["certainty"] == pytest.approx(math.exp(-0.1 / 0.05))
    # lower tau: a mismatched caption is punished harder
    low = _sims(0.3, bank, 0.01, **margin)["certainty"]
    assert low < _sims(0.3, bank, 0.1, **margin)["certainty"]


def test_imbalance_is_high_for_captions_that_fit_many_images():
    fits_all = [0.5] * 99
    singles_out = [0.0] * 99
    for kind in ("ambiguity", "entropy"):
        vague = _sims(0.5, fits_all, 0.05, imbalance=kind)["imbalance"]
        specific = _sims(0.9, singles_out, 0.01, imbalance=kind)["imbalance"]
        assert vague > 0.95 and specific < 0.05, (kind, vague, specific)
    # ambiguity: log(1 + #fitting at least as well) / log(1 + n)
    some = [0.6] * 9 + [0.0] * 90
    assert _sims(0.5, some, 0.05)["imbalance"] == pytest.approx(math.log(10) / math.log(100))


def test_batch_scores_match_pair_scores_and_exclude_self():
    rng = np.random.default_rng(3)
    bank = np.stack([unit(rng.normal(size=8)) for _ in range(20)])
    bank_texts = np.stack([unit(rng.normal(size=8)) for _ in range(20)])
    images = np.stack([bank[2], unit(rng.normal(size=8))])
    texts = np.stack([bank_texts[2], unit(rng.normal(size=8))])
    for kind in CERTAINTY_METHODS:
        for imbalance in ("ambiguity", "entropy"):
            cfg = ScoreConfig(certainty=kind, imbalance=imbalance)
            batch = batch_scores(images, texts, bank, 0.07, cfg, [2, None], bank_texts=bank_texts)
            for i, exclude in enumerate([2, None]):
                one = pair_scores(
                    images[i], texts[i], bank, 0.07, cfg, exclude, bank_texts=bank_texts
                )
                for name, value in one.items():
                    assert batch[name][i] == pytest.approx(value, rel=1e-12, abs=1e-15)
            # excluding the pair == scoring it against the bank without its row
            rest = np.delete(np.arange(20), 2)
            without = pair_scores(
                images[0], texts[0], bank[rest], 0.07, cfg, bank_texts=bank_texts[rest]
            )
            for name, value in without.items():
                assert batch[name][0] == pytest.approx(value, rel=1e-12, abs=1e-15), (kind, name)
    for kind in CERTAINTY_METHODS:
        alone = pair_scores(
            images[0], texts[0], bank[:1], 0.07, ScoreConfig(certainty=kind), 0, bank_texts[:1]
        )
        expected = (1 + alone["clip_score"]) / 2 if kind == "clip" else 1.0
        assert alone["certainty"] == pytest.approx(expected) and alone["imbalance"] == 0.0


def _dual_softmax(s_self, t2i, i2t, tau):
    """The documented formula, written out: sigma(log(1 + n) - symmetric InfoNCE loss)."""
    lse_t = math.log(math.exp(s_self / tau) + sum(math.exp(v / tau) for v in t2i))
    lse_i = math.log(math.exp(s_self / tau) + sum(math.exp(v / tau) for v in i2t))
    loss = (lse_t + lse_i) / 2 - s_self / tau
    return 1 / (1 + math.exp(loss - math.log(1 + len(t2i))))


def test_certainty_dual_softmax_and_clip_formulas():
    # text = e0; image = (s, sqrt(1 - s^2)); bank images (v, ...) and bank captions chosen so
    # that cos(bank_image_j, text) and cos(image, bank_caption_j) are known.
    s_self, tau = 0.6, 0.1
    text = np.array([1.0, 0.0, 0.0])
    image = np.array([s_self, math.sqrt(1 - s_self**2), 0.0])
    t2i = [0.1, 0.5, 0.7]
    bank_images = np.array([[v, 0.0, math.sqrt(1 - v * v)] for v in t2i])
    bank_texts = np.stack([unit([0.2, 0.9, 0.1]), unit([0.9, 0.1, 0.3]), unit([0.0, 0.0, 1.0])])
    i2t = (bank_texts @ image).tolist()
    cfg = ScoreConfig(certainty="dual_softmax")
    got = pair_scores(image, text, bank_images, tau, cfg, bank_texts=bank_texts)
    assert got["certainty"] == pytest.approx(_dual_softmax(s_self, t2i, i2t, tau), rel=1e-9)
    assert got["clip_score"] == pytest.approx(s_self)
    clip = pair_scores(image, text, bank_images, tau, ScoreConfig(certainty="clip"))
    assert clip["certainty"] == pytest.approx((1 + s_self) / 2)
    # chance: a pair no more likely than any bank pair, both ways, scores 0.5
    tie = pair_scores(image, text, np.stack([image] * 3), tau, cfg, bank_texts=np.stack([text] * 3))
    assert tie["certainty"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bank_texts"):
        pair_scores(image, text, bank_images, tau, cfg)


def _toy_world(noise=0.0, seed=0):
    """Images are object + colour directions (4 x 4 kinds, 4 copies each); a specific
    caption names both, a terse one only the object. The bank holds every image with a
    specific caption for half of them and a terse one for the other half."""
    rng = np.random.default_rng(seed)
    eye = np.eye(9)

    def image(o, c):
        return unit(eye[o] + eye[4 + c] + noise * rng.normal(size=9))

    images, texts = [], []
    for o in range(4):
        for c in range(4):
            for copy in range(4):
                images.append(image(o, c))
                texts.append(unit(eye[o] + eye[4 + c]) if copy % 2 else unit(eye[o]))
    return image, np.stack(images), np.stack(texts), eye


@pytest.mark.parametrize("noise", [0.0, 0.15])
def test_new_certainty_catches_a_mismatch_but_not_a_terse_caption(noise):
    image, bank_images, bank_texts, eye = _toy_world(noise)
    own = image(0, 0)
    specific, terse = unit(eye[0] + eye[4]), unit(eye[0])
    wrong = unit(eye[1] + eye[5])  # written for an image of another object and colour
    wrong_terse = unit(eye[1])  # a terse caption of another object
    for kind in ("dual_softmax", "clip"):
        cfg = ScoreConfig(certainty=kind)

        def certainty(text, cfg=cfg):
            out = pair_scores(own, text, bank_images, 0.05, cfg, bank_texts=bank_texts)
            return out["certainty"]

        c_spec, c_terse = certainty(specific), certainty(terse)
        c_wrong, c_wrong_terse = certainty(wrong), certainty(wrong_terse)
        assert c_spec > c_terse > max(c_wrong, c_wrong_terse), (kind, noise)
        if kind == "dual_softmax":
            assert c_spec > 0.5 > c_wrong and c_wrong < 1e-3


def test_certainty_stays_in_range_at_extreme_temperatures():
    rng = np.random.default_rng(5)
    bank = np.stack([unit(rng.normal(size=6)) for _ in range(30)])
    bank_texts = np.stack([unit(rng.normal(size=6)) for _ in range(30)])
    images = np.stack([unit(rng.normal(size=6)) for _ in range(10)] + [bank[0]])
    texts = np.stack([unit(rng.normal(size=6)) for _ in range(10)] + [bank_texts[0]])
    for kind in CERTAINTY_METHODS:
        for tau in (1e-4, 0.01, 1.0, 100.0):
            out = batch_scores(
                images, texts, bank, tau, ScoreConfig(certainty=kind), bank_texts=bank_texts
            )
            assert np.all(np.isfinite(out["certainty"]))
            assert np.all((out["certainty"] >= 0) & (out["certainty"] <= 1)), (kind, tau)


def test_pair_scores_on_a_toy_world():
    """A specific caption points at its own image; a vague one fits many images."""
    rng = np.random.default_rng(0)
    images = np.stack([unit(rng.normal(size=16)) for _ in range(64)])
    own = images[0]
    specific = own
    vague = unit(images[:32].mean(axis=0))
    wrong = images[40]
    cfg = ScoreConfig(certainty="rank", imbalance="entropy")
    s_spec = pair_scores(own, specific, images, 0.05, cfg, exclude=0)
    s_vague = pair_scores(own, vague, images, 0.05, cfg, exclude=0)
    s_wrong = pair_scores(own, wrong, images, 0.05, cfg, exclude=0)
    assert s_spec["certainty"] == 1.0
    assert s_wrong["certainty"] < 0.5
    assert s_vague["imbalance"] > s_spec["imbalance"]
    assert s_spec["clip_score"] == pytest.approx(1.0, abs=1e-5)


def test_make_bank_orders_by_hash_then_uid():
    entries = [
        (2, "b", np.ones(2), np.ones(2), 20.0, ("s", 1)),
        (1, "a", np.zeros(2), np.ones(2), 20.0, ("s", 0)),
    ]
    bank = make_bank(entries)
    assert bank["uids"] == ["a", "b"] and bank["tau"] == pytest.approx(0.05)
    assert bank["refs"] == [("s", 0), ("s", 1)] and bank["logit_scales"] == [20.0, 20.0]
    assert make_bank(entries, tau=0.1)["tau"] == 0.1
    assert bank["spares"] == []
    cut = make_bank(entries, size=1)  # the bank's first row; the other is a spare
    assert cut["uids"] == ["a"] and cut["images"].shape == (1, 2)
    ((uid, ref, image, text, scale),) = cut["spares"]
    assert (uid, ref, scale) == ("b", ("s", 1), 20.0) and image.tolist() == [1.0, 1.0]


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, txt = unit(rng.normal(size=8)), unit(rng.normal(size=8))
        row = {"image_embedding": img, "text_embedding": txt, "logit_scale": 20.0, "x": i}
        row.update(source="s", source_index=i)  # the bank keeps each row's ref
        out.append((f"u{i:03d}", row))
    return out


def test_bank_is_the_same_whatever_the_order():
    rows = _rows(40)
    cfg = ScoreConfig(bank_size=10)
    expected = sorted(rows, key=lambda kv: (uid_hash(kv[0], cfg.bank_salt), kv[0]))[:10]
    expected_uids = [u for u, _ in expected]
    with TestPipeline() as p:
        bank_a = p | "A" >> beam.Create(rows) | "BankA" >> SampleBank(cfg)
        bank_b = p | "B" >> beam.Create(rows[::-1]) | "BankB" >> SampleBank(cfg)
        for label, bank in (("a", bank_a), ("b", bank_b)):
            assert_that(
                bank | f"Uids{label}" >> beam.Map(lambda b: b["uids"]),
                equal_to([expected_uids]),
                label=f"uids-{label}",
            )
        scored = (p | "C" >> beam.Create(rows)) | ScorePairs(cfg, bank_a)
        assert_that(
            scored
            | beam.Map(
                lambda kv: (
                    kv[0],
                    "image_embedding" in kv[1],
                    0.0 <= kv[1]["certainty"] <= 1.0,
                    0.0 <= kv[1]["imbalance"] <= 1.0,
                )
            ),
            equal_to([(u, False, True, True) for u, _ in rows]),
            label="scored",
        )


# --- decision policy -------------------------------------------------------------------------


def _hists(values: dict[str, list[float]]):
    combine = ScoreHistograms()
    acc = combine.create_accumulator()
    n = len(next(iter(values.values())))
    for i in range(n):
        acc = combine.add_input(acc, {k: v[i] for k, v in values.items()})
    return combine.extract_output(acc)


def test_histogram_quantile():
    values = [0.10, 0.20, 0.30, 0.40]
    hist = _hists({name: values for name in ("certainty", "imbalance", "clip_score")})["certainty"]
    assert histogram_quantile(hist, 0.5) == pytest.approx(0.30, rel=0.008)  # 2 of 4 below
    assert sum(v < histogram_quantile(hist, 0.5) for v in values) == 2
    assert histogram_quantile(hist, 0.0) == pytest.approx(0.10, rel=0.008)
    assert sum(v < histogram_quantile(hist, 1.0) for v in values) == 4  # every row is below
    assert math.isfinite(histogram_quantile(hist, 1.0))  # the manifest stores it as JSON
    assert histogram_quantile(np.zeros_like(hist), 0.5) == 0.0


@pytest.mark.parametrize(
    "value", [0.0, -0.0, 1e-45, 3.8e-8, 1.1e-6, 0.011, 0.1, 0.5, 1.0, -1e-50, -0.3, -1.0]
)
def test_score_bins_are_ordered_and_contain_their_value(value):
    index = score_bin(value)
    assert bin_lower_edge(index) <= value < bin_lower_edge(index + 1)
    # Relative resolution: a bin is narrower than 1/128 of its values (away from subnormals).
    if abs(value) > 1e-30:
        width = bin_lower_edge(index + 1) - bin_lower_edge(index)
        assert width <= abs(value) / 128 + 1e-300


def test_quantile_of_scores_spread_over_many_decades():
    """The demo's certainty spans 1e-9 .. 1; equal-width bins put its 12% quantile at 0."""
    values = 10 ** np.random.default_rng(0).uniform(-9, 0, 5000)
    hist = _hists(
        {name: list(values) for name in ("certainty", "imbalance")} | {"clip_score": [0.0] * 5000}
    )
    threshold = histogram_quantile(hist["certainty"], 0.12)
    assert threshold == pytest.approx(np.quantile(values, 0.12), rel=0.01)
    assert int((values < threshold).sum()) == 600


def test_threshold_modes_and_decisions():
    values = np.linspace(0.0, 0.99, 100)
    hists = _hists(
        {"certainty": list(values), "imbalance": list(values), "clip_score": list(values)}
    )
    cfg = DecideConfig(drop=Rule("quantile", 0.2), recaption=Rule("top_fraction", 0.3))
    t = resolve_thresholds(cfg, hists)
    dropped = sum(v < t["certainty"] for v in values)
    recaptioned = sum(v > t["imbalance"] for v in values)
    assert dropped == 20 and recaptioned == 30 and t["clip_score"] is None
    cfg = DecideConfig(drop=Rule("top_fraction", 0.3), recaption=Rule("off", 0.0))
    t = resolve_thresholds(cfg, hists)
    assert sum(v >= t["certainty"] for v in values) == 30
    with pytest.raises(ValueError):
        resolve_thresholds(cfg, None)
    t = resolve_thresholds(DecideConfig(drop_clip=Rule("absolute", 0.2)), None)
    row = {"certainty": 0.9, "clip_score": 0.1, "imbalance": 0.1}
    assert decide(row, t) == ("drop", Reason.LOW_CLIP_SCORE)
    assert decide({**row, "certainty": 0.1}, t) == ("drop", Reason.LOW_CERTAINTY)
    assert decide({**row, "clip_score": 0.5, "imbalance": 0.9}, t) == (
        "recaption",
        Reason.HIGH_IMBALANCE,
    )
    assert decide({**row, "clip_score": 0.5}, t) == ("keep", Reason.PASSED)
    with pytest.raises(ValueError):
        Rule("quantile", 1.5)


# --- the ModelHandler ------------------------------------------------------------------------


def _pairs(n):
    rng = np.random.default_rng(1)
    return [
        {
            "pixels": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "caption": f"a red circle {i}",
        }
        for i in range(n)
    ]


def test_handler_is_deterministic_and_normalised():
    cfg = ClipModelConfig(min_batch_size=2, max_batch_size=4, metrics_namespace="ns")
    handler = ClipModelHandler(cfg)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 4}
    assert handler.get_metrics_namespace() == "ns"
    assert not handler.share_model_across_processes()
    pairs = _pairs(3)
    out_a = list(handler.run_inference(pairs, handler.load_model()))
    out_b = list(handler.run_inference(pairs, ClipModelHandler(cfg).load_model()))
    for i, (a, b) in enumerate(zip(out_a, out_b, strict=True)):
        np.testing.assert_array_equal(
            a.inference["image_embedding"], b.inference["image_embedding"]
        )
        assert np.linalg.norm(a.inference["text_embedding"]) == pytest.approx(1.0, abs=1e-5)
        assert a.model_id == "capgap-micro-vit/random-init-seed0"
        assert a.example is pairs[i]
    assert handler.get_num_bytes(pairs) == sum(
        p["pixels"].nbytes + len(p["caption"]) for p in pairs
    )
    shared = ClipModelHandler(ClipModelConfig(share_model_across_processes=True, model_copies=2))
    assert shared.share_model_across_processes() and shared.model_copies() == 2
    fp = model_fingerprint(cfg)
    assert len(fp["sha256"]) == 64 and fp == model_fingerprint(cfg)
    assert model_fingerprint(ClipModelConfig(seed=1))["sha256"] != fp["sha256"]


def test_handler_passes_precomputed_pairs_through_without_the_model():
    handler = ClipModelHandler(ClipModelConfig(min_batch_size=2, max_batch_size=4))
    model = handler.load_model()
    pairs = _pairs(4)
    alone = list(handler.run_inference(pairs[1:3], model))
    known = {
        "image_embedding": np.full(8, 0.5, np.float32),
        "text_embedding": np.full(8, -0.5, np.float32),
        "logit_scale": 42.0,
        "finite": True,
    }
    mixed = [{"caption": "from the bank", PRECOMPUTED: known}, pairs[1], pairs[2], pairs[3]]
    seen = []
    embed = model.embed
    model.embed = lambda pixels, captions: seen.append(list(captions)) or embed(pixels, captions)
    try:
        out = list(handler.run_inference(mixed, model))
        assert seen == [["a red circle 1", "a red circle 2", "a red circle 3"]]
        assert [r.example for r in out] == mixed  # one prediction per pair, in order
        assert out[0].inference is known
        for got, want in zip(out[1:3], alone, strict=True):
            np.testing.assert_allclose(
                got.inference["image_embedding"], want.inference["image_embedding"], atol=1e-5
            )
            assert got.inference["finite"] and got.inference["logit_scale"] == pytest.approx(
                want.inference["logit_scale"]
            )
        seen.clear()
        only_known = list(handler.run_inference(mixed[:1], model))
        assert seen == [] and only_known[0].inference is known  # no model call at all
    finally:
        del model.embed
    assert handler.get_num_bytes(mixed[:2]) == pairs[1]["pixels"].nbytes + len(pairs[1]["caption"])


def test_steps_on_the_same_weights_share_one_model_per_process():
    main = ClipModelHandler(ClipModelConfig(min_batch_size=2, max_batch_size=4)).load_model()
    bank = ClipModelHandler(ClipModelConfig(metrics_namespace="capgap_clip_bank")).load_model()
    assert bank is main  # batching and counters differ, the weights do not
    other = ClipModelHandler(ClipModelConfig(seed=1)).load_model()
    assert other is not main


@pytest.mark.parametrize("name", ["capgap-micro-vit", "capgap-micro-rn"])
def test_cpu_bf16_embeds_close_to_float32(name):
    import torch

    pairs = _pairs(4)
    fp32 = ClipModelHandler(ClipModelConfig(name=name, min_batch_size=2, max_batch_size=4))
    bf16 = ClipModelHandler(
        ClipModelConfig(name=name, min_batch_size=2, max_batch_size=4, cpu_bf16=True)
    )
    assert fp32.load_model() is not bf16.load_model()
    assert next(bf16.load_model().model.parameters()).dtype == torch.bfloat16
    assert bf16.load_model().logit_scale == fp32.load_model().logit_scale  # read in float32
    out32 = list(fp32.run_inference(pairs, fp32.load_model()))
    out16 = list(bf16.run_inference(pairs, bf16.load_model()))
    for a, b in zip(out32, out16, strict=True):
        for key in ("image_embedding", "text_embedding"):
            x, y = a.inference[key], b.inference[key]
            assert y.dtype == np.float32 and np.linalg.norm(y) == pytest.approx(1.0, abs=1e-5)
            assert float(x @ y) > 0.99  # bf16 keeps ~3 significant digits
        # bf16 arithmetic ran: the floats moved
        assert not np.array_equal(a.inference["image_embedding"], b.inference["image_embedding"])
    assert ClipModelConfig(cpu_bf16=True).weights_dtype("cpu") == "bf16"
    assert ClipModelConfig(cpu_bf16=True).weights_dtype("cuda") is None
    assert ClipModelConfig(cpu_bf16=True).autocast_dtype("cpu") is None
    assert ClipModelConfig(amp=False).autocast_dtype("cuda") is None
    assert ClipModelConfig(amp_dtype="fp16").autocast_dtype("cuda") == "fp16"
    assert ClipModelConfig().autocast_dtype("cpu") is None


def test_torch_threads_limit_numpy_blas_too():
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    threads = torch.get_num_threads()
    # two BLAS threads first, whatever this machine's default; put back afterwards
    with threadpool_limits(limits=2, user_api="blas"):
        ClipEmbedder(ClipModelConfig(torch_threads=1))
        blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas and set(blas) == {1}
    torch.set_num_threads(threads)


def test_cpu_bf16_embeddings_live_in_a_cache_space_of_their_own():
    from capgap.transforms.cache import embed_space
    from capgap.transforms.decode import DecodeConfig

    def space(**model):
        return embed_space(ClipModelConfig(**model), DecodeConfig()).fingerprint

    assert space(cpu_bf16=True) != space()
    assert space(device="cuda", cpu_bf16=True) == space(device="cuda")  # CUDA: amp decides
    assert space(device="cuda", amp=False) != space(device="cuda")
    assert space(amp=False) == space()  # amp is CUDA's
    # float32 spaces hold the same settings as before cpu_bf16 existed: old caches still hit
    settings = embed_space(ClipModelConfig(), DecodeConfig()).settings
    assert set(settings) == {"format", "model", "device", "amp", "amp_dtype", "decode"}
    assert (settings["amp"], settings["amp_dtype"]) == (False, None)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_loudly():
    handler = ClipModelHandler(ClipModelConfig(device="cuda"))
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        handler.load_model()


def test_config_validation():
    with pytest.raises(ValueError):
        ClipModelConfig(min_batch_size=8, max_batch_size=4)
    with pytest.raises(ValueError):
        ScoreConfig(bank_size=1)


class _NanForOddRows:
    """An embedder whose odd rows come out NaN (image) or inf (text), as a broken model's."""

    def embed(self, pixels, captions):
        n = len(pixels)
        img = np.tile(unit(np.ones(8)), (n, 1)).astype(np.float32)
        txt = img.copy()
        img[1::4] = np.nan
        txt[3::4] = np.inf
        return img, txt, 20.0


def test_a_failed_model_batch_fails_its_model_rows_and_keeps_the_precomputed_ones(monkeypatch):
    """The model raises on a batch: the pairs it held become inference_failed rows, with the
    exception; a pair that carried its embeddings (bank, cache) keeps them, in ok."""

    def broken(self, pixels, captions):
        raise RuntimeError(f"device lost on {len(captions)} pairs")

    monkeypatch.setattr(ClipEmbedder, "embed", broken)
    known = {
        "image_embedding": unit(np.ones(8)).astype(np.float32),
        "text_embedding": unit(np.ones(8)).astype(np.float32),
        "logit_scale": 20.0,
        "finite": True,
    }
    rows = [dict(p, uid=f"u{i}", source="s", source_index=i) for i, p in enumerate(_pairs(3))]
    banked = {"uid": "b", "source": "s", "source_index": 9, "caption": "c", PRECOMPUTED: known}
    model = ClipModelConfig(min_batch_size=4, max_batch_size=4)
    with TestPipeline() as p:
        out = (
            p
            | beam.Create([(r["uid"], r) for r in [*rows, banked]], reshuffle=False)
            | EmbedPairs(model)
        )
        assert_that(out["ok"] | beam.Map(lambda kv: kv[0]), equal_to(["b"]), label="ok")
        errors = out[ERRORS] | beam.Map(
            lambda e: (e["uid"], e["reason"], e["error_class"], e["message"].split()[0])
        )
        failed = [(r["uid"], "inference_failed", "RuntimeError", "device") for r in rows]
        assert_that(errors, equal_to(failed), label="errors")


def test_non_finite_embeddings_are_flagged_and_go_to_errors():
    handler = ClipModelHandler(ClipModelConfig())
    pairs = [dict(p, uid=f"u{i}", source="s", source_index=i) for i, p in enumerate(_pairs(4))]
    results = list(handler.run_inference(pairs, _NanForOddRows()))
    assert [r.inference["finite"] for r in results] == [True, False, True, False]
    outputs = [o for r in results for o in _EmbeddedRowFn().process((r.example["uid"], r))]
    errors = [o.value for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
    assert [e["uid"] for e in errors] == ["u1", "u3"]
    assert {e["reason"] for e in errors} == {Reason.EMBEDDING_NONFINITE.value}
    assert [uid for uid, _ in (o for o in outputs if isinstance(o, tuple))] == ["u0", "u2"]
