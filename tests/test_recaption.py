"""The Recaption PTransform and its handlers, end to end in TestPipeline on tiny HF models.

The tiny captioners (VisionEncoderDecoder = the embedded default, LLaVA with a
chat template) are built and overfitted by ``test_captioner.py``'s helpers, so
each of the two test images has one known caption; the quality gate uses a
randomly initialised reference CLIP run saved the way ``capgap train`` saves one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import apache_beam as beam
import pytest
import torch
import yaml
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from capgap.models.captioner import CaptionerConfig, fingerprint_dir
from capgap.models.recaption_handler import (
    CaptionGateModelHandler,
    GateScores,
    RecaptionModelHandler,
    gate_clip,
)
from capgap.transforms.recaption import GateConfig, Recaption, RecaptionConfig, finalize_row


def _helpers():
    spec = importlib.util.spec_from_file_location(
        "capgap_test_captioner_helpers", Path(__file__).with_name("test_captioner.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


H = _helpers()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on shared cores they only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ved_dir(tmp_path_factory) -> Path:
    return H.make_ved_dir(tmp_path_factory.mktemp("ved"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return H.make_llava_dir(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    from capgap.models.clip_factory import create_clip, save_checkpoint

    run = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model, _, _ = create_clip("capgap-micro-vit")
    save_checkpoint(model, run / "model.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "capgap-micro-vit"}))
    return run


def _rows(order=(0, 1, 1, 0)) -> list[dict]:
    images = [H.png_bytes(im) for im in H.two_images()]
    terse = ("a circle", "a square")
    return [
        {
            "uid": f"web-{i:03d}",
            "image": images[k],
            "caption": terse[k],
            "clip_score": 0.1 * i,
            "object": ("circle", "square")[k],
        }
        for i, k in enumerate(order)
    ]


def _view(rows, *keys):
    return sorted(tuple(row.get(k) for k in keys) for row in rows)


# --- pure row logic -------------------------------------------------------------------------


def test_finalize_row_statuses_and_columns():
    cfg = RecaptionConfig()
    row = {"uid": "u", "image": b"x", "caption": "a circle", "clip_score": 0.3, "k": 1}
    out = finalize_row(row, " a red circle ", "m@f", cfg)
    assert out["caption"] == "a red circle" and out["original_caption"] == "a circle"
    assert out["caption_source"] == "m@f" and out["recaption_status"] == "recaptioned"
    assert out["clip_score"] == 0.3 and out["k"] == 1 and out["gate_clip_score_new"] is None
    assert row["caption"] == "a circle"  # the input row is not mutated

    empty = finalize_row(row, "  ", "m@f", cfg)
    assert empty["recaption_status"] == "kept_original_empty"
    assert empty["caption"] == "a circle" and empty["caption_source"] == "original"

    gated = finalize_row(row, "a blue square", "m@f", cfg, GateScores(new=0.1, original=0.2))
    assert gated["recaption_status"] == "kept_original_gate" and gated["caption"] == "a circle"
    assert gated["gate_clip_score_new"] == pytest.approx(0.1)
    close = RecaptionConfig(gate=GateConfig(margin=0.15))
    kept = finalize_row(row, "a red circle", "m@f", close, GateScores(new=0.1, original=0.2))
    assert kept["recaption_status"] == "recaptioned"

    separate = RecaptionConfig(output_column="dense_caption")
    out = finalize_row(row, "a red circle", "m@f", separate)
    assert out["caption"] == "a circle" and out["dense_caption"] == "a red circle"


def test_config_validation():
    with pytest.raises(ValueError, match="clip_run"):
        GateConfig(enabled=True)
    with pytest.raises(ValueError, match="output_column"):
        RecaptionConfig(output_column="original_caption")


# --- handlers -------------------------------------------------------------------------------


def test_handler_is_lazy_and_batches_as_configured(tmp_path):
    handler = RecaptionModelHandler(
        CaptionerConfig(model=str(tmp_path / "not-yet"), batch_size=8),
        min_batch_size=2,
        share_model_across_processes=True,
    )  # constructing never touches the model
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 8}
    assert handler.share_model_across_processes()
    assert not RecaptionModelHandler(CaptionerConfig()).share_model_across_processes()
    with pytest.raises(FileNotFoundError):
        handler.load_model()


def test_handler_run_inference_keeps_rows_and_order(ved_dir):
    handler = RecaptionModelHandler(CaptionerConfig(model=str(ved_dir), batch_size=3))
    model = handler.load_model()
    rows = _rows((1, 0, 0, 1, 0))
    results = list(handler.run_inference(rows, model))
    assert [r.example for r in results] == rows
    assert [r.inference for r in results] == [H.CAPTIONS[k] for k in (1, 0, 0, 1, 0)]
    assert {r.model_id for r in results} == {f"{ved_dir}@{fingerprint_dir(ved_dir)}"}


# --- the PTransform in TestPipeline -----------------------------------------------------------


def test_recaption_in_pipeline_with_embedded_captioner(ved_dir):
    order = (0, 1, 1, 0)
    rows = _rows(order)
    cfg = RecaptionConfig(captioner=CaptionerConfig(model=str(ved_dir)), max_batch_size=3)
    source = f"{ved_dir}@{fingerprint_dir(ved_dir)}"
    expected = [
        (
            r["uid"],
            H.CAPTIONS[k],
            r["caption"],
            source,
            "recaptioned",
            r["clip_score"],
            r["object"],
        )
        for r, k in zip(rows, order, strict=True)
    ]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | Recaption(cfg)
        assert_that(
            out
            | beam.Map(
                lambda r: (
                    r["uid"],
                    r["caption"],
                    r["original_caption"],
                    r["caption_source"],
                    r["recaption_status"],
                    r["clip_score"],
                    r["object"],
                )
            ),
            equal_to(expected),
        )


def test_recaption_in_pipeline_with_chat_vlm_and_separate_column(llava_dir):
    rows = _rows((0, 1))
    cfg = RecaptionConfig(
        captioner=CaptionerConfig(model=str(llava_dir), prompt=H.LLAVA_PROMPT, max_new_tokens=8),
        output_column="dense_caption",
    )
    expected = [(r["uid"], r["caption"], H.CAPTIONS[k]) for r, k in zip(rows, (0, 1), strict=True)]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | Recaption(cfg)
        assert_that(
            out | beam.Map(lambda r: (r["uid"], r["caption"], r["dense_caption"])),
            equal_to(expected),
        )


@pytest.mark.parametrize(
    ("margin", "status"), [(10.0, "recaptioned"), (-10.0, "kept_original_gate")]
)
def test_quality_gate_in_pipeline(ved_dir, clip_run, margin, status):
    rows = _rows((0, 1))
    cfg = RecaptionConfig(
        captioner=CaptionerConfig(model=str(ved_dir)),
        gate=GateConfig(enabled=True, clip_run=str(clip_run), margin=margin),
    )
    final = {"recaptioned": list(H.CAPTIONS), "kept_original_gate": [r["caption"] for r in rows]}
    expected = [(r["uid"], status, caption) for r, caption in zip(rows, final[status], strict=True)]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | Recaption(cfg)
        assert_that(
            out | beam.Map(lambda r: (r["uid"], r["recaption_status"], r["caption"])),
            equal_to(expected),
            label="status",
        )
        assert_that(
            out
            | beam.Map(
                lambda r: (
                    -1.0 <= r["gate_clip_score_new"] <= 1.0
                    and -1.0 <= r["gate_clip_score_original"] <= 1.0
                )
            ),
            equal_to([True, True]),
            label="scores",
        )


def test_gate_scores_match_the_reference_clip(ved_dir, clip_run):
    from capgap.models.clip_factory import load_run

    handler = CaptionGateModelHandler(str(clip_run))
    rows = _rows((0, 1))
    batch = [(row, H.CAPTIONS[1 - i], "src") for i, row in enumerate(rows)]
    scores = [r.inference for r in handler.run_inference(batch, handler.load_model())]
    model, preprocess, tokenizer = load_run(clip_run)
    images = torch.stack([preprocess(im) for im in H.two_images()])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        new = torch.nn.functional.normalize(
            model.encode_text(tokenizer(list(H.CAPTIONS[::-1]))), dim=-1
        )
        old = torch.nn.functional.normalize(
            model.encode_text(tokenizer(["a circle", "a square"])), dim=-1
        )
    assert [s.new for s in scores] == pytest.approx((img * new).sum(-1).tolist(), abs=1e-5)
    assert [s.original for s in scores] == pytest.approx((img * old).sum(-1).tolist(), abs=1e-5)


def test_the_gate_takes_the_scoring_models_precision_and_shares_its_copy(clip_run):
    """The gate CLIP runs as the scoring CLIP does (cpu_bf16, threads, autocast on CUDA) and,
    when it is the scoring CLIP, is the same object in memory; in bf16 its cosines stay within
    0.02 of float32's; its cache space moves with bf16 and not for float32."""
    from capgap.models.clip_handler import ClipModelConfig, load_embedder
    from capgap.transforms.cache import gate_space

    scoring = ClipModelConfig(
        run_dir=str(clip_run), cpu_bf16=True, torch_threads=1, max_batch_size=16
    )
    clip = gate_clip(str(clip_run), "cpu", scoring)
    assert (clip.run_dir, clip.cpu_bf16, clip.torch_threads) == (str(clip_run), True, 1)
    bf16 = CaptionGateModelHandler(clip)
    assert bf16.load_model().embedder is load_embedder(scoring)  # one copy in memory
    fp32 = CaptionGateModelHandler(str(clip_run))
    rows = _rows((0, 1))
    batch = [(row, H.CAPTIONS[1 - i], "src") for i, row in enumerate(rows)]
    want = [r.inference for r in fp32.run_inference(batch, fp32.load_model())]
    got = [r.inference for r in bf16.run_inference(batch, bf16.load_model())]
    for a, b in zip(got, want, strict=True):
        assert a.new == pytest.approx(b.new, abs=0.02) and a != b  # bf16 moves the floats
        assert a.original == pytest.approx(b.original, abs=0.02)
    float32 = gate_space(gate_clip(str(clip_run), "cpu"))
    assert set(float32.settings) == {"format", "model", "device"}  # as before: old caches hit
    assert gate_space(clip).fingerprint != float32.fingerprint
    cuda = gate_space(gate_clip(str(clip_run), "cuda"))
    assert cuda.settings["amp_dtype"] == "bf16"  # autocast on CUDA, as the scoring CLIP


def test_failed_batches_keep_their_captions(ved_dir):
    good, bad = _rows((0, 1))
    bad = {**bad, "image": b"not an image"}
    cfg = RecaptionConfig(captioner=CaptionerConfig(model=str(ved_dir)), max_batch_size=1)
    with TestPipeline() as p:
        out = p | beam.Create([good, bad]) | Recaption(cfg)
        assert_that(
            out
            | beam.Map(
                lambda r: (
                    r["uid"],
                    r["caption"],
                    r["recaption_status"],
                    (r["recaption_error"] or "").split(":")[0],
                    f"row {r['uid']}" in (r["recaption_error"] or ""),  # names the failed row
                )
            ),
            equal_to(
                [
                    (good["uid"], H.CAPTIONS[0], "recaptioned", "", False),
                    (bad["uid"], bad["caption"], "kept_original_error", "ValueError", True),
                ]
            ),
        )
    strict = RecaptionConfig(captioner=CaptionerConfig(model=str(ved_dir)), on_error="fail")
    with pytest.raises(Exception, match="cannot identify image"), TestPipeline() as p:
        _ = p | beam.Create([bad]) | Recaption(strict)
