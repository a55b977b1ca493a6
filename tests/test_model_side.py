"""The copy of each image the scoring model gets is decoded down to the model's own input
side (``decode.model_max_side`` unset): read from the model's config, kept when set, and
the model's embedding of that copy matches its embedding of the full-size image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import yaml
from PIL import Image

from capgap.core.config import ConfigError
from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig, model_input_side
from capgap.models.hf_clip import build_random_hf_clip
from capgap.pipeline.curate import CurateConfig, planned_pipeline, with_model_side
from capgap.transforms.decode import DecodeConfig, decode_image


@pytest.mark.parametrize(
    ("name", "side"),
    [("capgap-micro-vit", 32), ("capgap-small-vit", 64), ("ViT-B-32", 224), ("ViT-L-14-336", 336)],
)
def test_open_clip_architectures(name, side):
    assert model_input_side(ClipModelConfig(name=name)) == side


def test_a_run_reads_its_architecture(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": "capgap-small-vit"}))
    assert model_input_side(ClipModelConfig(run_dir=str(tmp_path))) == 64


@pytest.mark.parametrize(("family", "side"), [("clip", 40), ("siglip", 48)])
def test_transformers_processors(tmp_path, family, side):
    folder = build_random_hf_clip(tmp_path / family, family, image_size=side, patch_size=8)
    assert model_input_side(ClipModelConfig(hf_model=str(folder))) == side


def test_curate_fills_in_the_side_and_keeps_a_set_one(tmp_path):
    cfg = CurateConfig(input="x", model=ClipModelConfig(name="capgap-small-vit"))
    assert cfg.decode.model_max_side is None
    assert with_model_side(cfg).decode.model_max_side == 64
    for side in (0, 448):
        set_cfg = CurateConfig(input="x", decode=DecodeConfig(model_max_side=side))
        assert with_model_side(set_cfg).decode.model_max_side == side
    missing = CurateConfig(input="x", model=ClipModelConfig(hf_model=str(tmp_path / "no" / "x")))
    with pytest.raises(ConfigError, match="decode.model_max_side"):
        with_model_side(missing)


def photo_jpeg(width: int, height: int) -> bytes:
    """A smooth colour field with some edges: what a downscale can keep or lose."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [128 + 100 * np.sin(x / 23.0), 128 + 100 * np.cos(y / 17.0), (x + y) % 256], axis=-1
    )
    rgb[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 20)
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_the_models_copy_embeds_like_the_full_image():
    """A 640x480 JPEG: decoded at reduced scale to the micro model's 32 px (libjpeg's 1/8
    scale, then one resize), its image embedding matches the model's own preprocessing of
    the full decode; the stored image keeps the full size."""
    data = photo_jpeg(640, 480)
    model = ClipModelConfig(name="capgap-micro-vit")
    side = with_model_side(CurateConfig(input="x", model=model)).decode.model_max_side
    small = decode_image(data, DecodeConfig(model_max_side=side))
    full = decode_image(data, DecodeConfig(model_max_side=0))
    assert min(small.pixels.shape[:2]) == 32 and full.pixels.shape[:2] == (480, 640)
    assert (small.width, small.height) == (640, 480) and small.data == data
    embedder = ClipEmbedder(model)
    img, _, _ = embedder.embed([small.pixels, full.pixels], ["a photo", "a photo"])
    assert float(img[0] @ img[1]) > 0.99


def test_an_unreadable_model_fails_before_the_output_is_touched(tmp_path):
    """With --overwrite, a finished build is cleared before the new one runs: a model whose
    side cannot be read must fail first, leaving the previous build in place."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "manifest.json").write_text("{}")
    cfg = CurateConfig(
        input=str(tmp_path / "*.parquet"),
        output=str(output),
        overwrite=True,
        model=ClipModelConfig(hf_model=str(tmp_path / "no" / "model")),
    )
    with pytest.raises(ConfigError, match="decode.model_max_side"):
        planned_pipeline(cfg)
    assert (output / "manifest.json").exists()


@pytest.mark.parametrize("size", [(100, 77), (77, 100), (96, 64)])
def test_the_copy_is_what_the_models_own_resize_makes_of_the_full_image(size):
    """At the model's own side the copy is sized as torchvision's Resize sizes it (the long
    side truncated: 100x77 -> 41x32, not 42x32), so the model's preprocessing of the copy
    and of the full-size image give the same tensor."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buffer, "PNG")
    copy = decode_image(buffer.getvalue(), DecodeConfig(model_max_side=32)).pixels
    full = decode_image(buffer.getvalue(), DecodeConfig(model_max_side=0)).pixels
    preprocess = ClipEmbedder(ClipModelConfig(name="capgap-micro-vit")).preprocess
    a, b = preprocess(Image.fromarray(copy)), preprocess(Image.fromarray(full))
    assert a.shape == b.shape == (3, 32, 32)
    assert float((a - b).abs().max()) < 1e-6
