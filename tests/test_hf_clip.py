"""Scoring with transformers CLIP / SigLIP checkpoints (``model.hf_model``), offline.

The checks lean on code capgap did not write: the rebuilt tokenizer must give open_clip's
OpenAI-BPE ids, and the curated ``clip_score`` must equal what transformers' own
``CLIPModel`` forward (through ``AutoProcessor``) says for the same pair.

    .venv/bin/python -m pytest -q tests/test_hf_clip.py
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

from capgap.core.config import ConfigError
from capgap.models.clip_handler import ClipModelConfig, model_fingerprint
from capgap.models.hf_clip import build_random_hf_clip, load_hf_clip
from capgap.pipeline import curate
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row

CAPTIONS = [
    "a red star on a blue background",
    "A Dotted square, LARGE, at the top-left!  ",
    "café naïve 3.5cm, 2 × 3",  # (HTML entities differ: open_clip unescapes them, HF does not)
    "word " * 100,  # truncated: the end-of-text token must still close it
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        family: str(build_random_hf_clip(root / family, family, seed=1))
        for family in ("clip", "siglip")
    }


@pytest.fixture(scope="module")
def web_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    split = SplitConfig(n=12, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "web-0.parquet")
    return str(root / "*.parquet")


def curate_with(pattern: str, output, *sets: str) -> dict:
    argv = ["--input", pattern, "--output", str(output)]
    for s in ("score.bank_size=6", "model.min_batch_size=4", "model.max_batch_size=8", *sets):
        argv += ["--set", s]
    return curate.run(argv, test_pipeline=TestPipeline())


def read(output, folder: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(str(output), folder, "*.parquet")))
    return [row for path in files for row in pq.read_table(path).to_pylist()]


def test_tokenizer_gives_open_clips_ids(checkpoints):
    _, _, tokenizer = load_hf_clip(checkpoints["clip"])
    ours = tokenizer(CAPTIONS)
    reference = open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)  # OpenAI CLIP's BPE
    assert ours.shape == reference.shape == (len(CAPTIONS), 77)
    for mine, theirs in zip(ours, reference, strict=True):
        n = int((theirs != 0).sum())  # open_clip pads with 0, transformers with end-of-text
        assert mine[:n].tolist() == theirs[:n].tolist()
        assert (mine[n:] == 49407).all()


def test_siglip_pads_to_its_length(checkpoints):
    model, preprocess, tokenizer = load_hf_clip(checkpoints["siglip"])
    assert tokenizer(CAPTIONS).shape == (len(CAPTIONS), 64)
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert hasattr(model, "logit_bias")


def test_curated_clip_score_equals_transformers_forward(checkpoints, web_shard, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    manifest = curate_with(web_shard, tmp_path / "out", f"model.hf_model={checkpoints['clip']}")
    rows = read(tmp_path / "out", "curated") + read(tmp_path / "out", "rejected")
    assert len(rows) == 12 == manifest["counts"]["rows_in"]
    assert manifest["models"]["clip"]["id"] == "hf:clip"
    assert len(manifest["models"]["clip"]["sha256"]) == 64
    model = CLIPModel.from_pretrained(checkpoints["clip"]).eval()
    processor = AutoProcessor.from_pretrained(checkpoints["clip"])
    images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in rows]
    inputs = processor(
        text=[r["caption"] for r in rows], images=images, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        expected = (logits.diagonal() / model.logit_scale.exp()).numpy()
    got = np.array([r["clip_score"] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert {r["model_id"] for r in rows} == {"hf:clip"}


def test_siglip_curates_every_row(checkpoints, web_shard, tmp_path):
    manifest = curate_with(web_shard, tmp_path / "out", f"model.hf_model={checkpoints['siglip']}")
    counts = manifest["counts"]
    assert counts["rows_in"] == 12 == counts["curated"] + counts["rejected"]
    assert manifest["models"]["clip"]["architecture"] == "transformers"


def test_fingerprint_follows_the_weights(checkpoints, tmp_path):
    cfg = ClipModelConfig(hf_model=checkpoints["clip"])
    before = model_fingerprint(cfg)["sha256"]
    other = build_random_hf_clip(tmp_path / "clip", "clip", seed=2)
    after = model_fingerprint(ClipModelConfig(hf_model=str(other)))["sha256"]
    assert before != after and len(before) == 64
    assert (
        model_fingerprint(ClipModelConfig(hf_model="openai/clip-vit-base-patch32"))["sha256"]
        is None
    )  # a hub id is identified by name; nothing is downloaded to hash it


def test_one_scoring_model_only(checkpoints, web_shard, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="hf_model"):
        curate_with(
            web_shard,
            tmp_path / "out",
            f"model.hf_model={checkpoints['clip']}",
            "model.run_dir=runs/ref",
        )


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf_model"):
        load_hf_clip(str(tmp_path / "nowhere"))


def test_text_tower_sized_apart(tmp_path):
    from transformers import CLIPModel

    folder = build_random_hf_clip(tmp_path / "c", width=48, heads=4, text_width=32, text_heads=2)
    config = CLIPModel.from_pretrained(folder).config
    assert (config.vision_config.hidden_size, config.vision_config.num_attention_heads) == (48, 4)
    assert (config.text_config.hidden_size, config.text_config.num_attention_heads) == (32, 2)
    assert config.text_config.intermediate_size == 128
    model, _, tokenizer = load_hf_clip(str(folder))
    assert model.encode_text(tokenizer(CAPTIONS)).shape == (len(CAPTIONS), 32)
    with pytest.raises(ValueError, match="text_width"):
        build_random_hf_clip(tmp_path / "s", "siglip", text_width=32)


def test_clip_text_padding_cut_changes_nothing(checkpoints):
    model, _, tokenizer = load_hf_clip(checkpoints["clip"])
    short = CAPTIONS[:3]  # the fourth fills all 77 positions
    ids = tokenizer(short)
    lengths = []
    hook = model.hf.text_model.embeddings.register_forward_hook(
        lambda module, args, out: lengths.append(out.shape[1])
    )
    with torch.no_grad():
        got = model.encode_text(ids)
        full = model._features(model.hf.get_text_features(input_ids=ids))
    hook.remove()
    assert ids.shape[1] == 77 and lengths[0] < 20 and lengths[1] == 77
    longest = max(len(tokenizer.tokenizer(c)["input_ids"]) for c in short)
    assert lengths[0] == longest
    np.testing.assert_allclose(got.numpy(), full.numpy(), atol=1e-5)
    siglip, _, siglip_tokenizer = load_hf_clip(checkpoints["siglip"])
    assert max(model.used_lengths(tokenizer(CAPTIONS))) == 77
    assert siglip.used_lengths(siglip_tokenizer(CAPTIONS)) is None


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bf16_weights_score_close_to_float32(checkpoints, web_shard, tmp_path, kind):
    model = f"model.hf_model={checkpoints[kind]}"
    curate_with(web_shard, tmp_path / "f32", model)
    curate_with(web_shard, tmp_path / "b16", model, "model.cpu_bf16=true")

    def scores(out) -> dict[str, float]:
        return {r["uid"]: r["clip_score"] for f in ("curated", "rejected") for r in read(out, f)}

    f32, b16 = scores(tmp_path / "f32"), scores(tmp_path / "b16")
    assert f32.keys() == b16.keys() and len(f32) == 12
    diffs = [abs(f32[uid] - b16[uid]) for uid in f32]
    assert 0 < max(diffs) < 0.02  # bf16 ran (the scores moved), and not far
