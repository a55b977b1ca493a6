"""CLIP factory: our configs and open_clip names build offline; checkpoints round-trip safely."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from capgap.models import clip_factory
from capgap.models.clip_factory import create_clip, load_run, load_state_dict, save_checkpoint


@pytest.mark.parametrize(
    ("name", "image_size", "context", "embed"),
    [
        ("capgap-micro-vit", 32, 20, 64),
        ("capgap-micro-rn", 32, 20, 64),
        ("capgap-small-vit", 64, 32, 128),
    ],
)
def test_our_configs_build_and_encode(name, image_size, context, embed):
    model, preprocess, tokenizer = create_clip(name)
    model.eval()  # the ResNet tower's BatchNorm needs more than one value per channel to train
    image = preprocess(Image.new("RGB", (image_size, image_size), (200, 10, 10)))
    assert image.shape == (3, image_size, image_size)
    tokens = tokenizer(["a red circle", "a large blue square on a grey background"])
    assert tokens.shape == (2, context)  # tokenizer context follows the config
    with torch.no_grad():
        img, txt, scale = model(image[None], tokens[:1])
    assert img.shape == txt.shape == (1, embed)
    assert torch.allclose(img.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_open_clip_architecture_by_name_without_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr("open_clip.factory.download_pretrained", no_download)
    model, preprocess, tokenizer = create_clip("ViT-B-32")
    assert model.visual.image_size == (224, 224)
    assert tokenizer(["x"]).shape == (1, 77)


def test_capgap_configs_are_listed():
    names = clip_factory.list_architectures()
    assert {"capgap-micro-vit", "capgap-small-vit", "ViT-B-32"} <= set(names)


def test_unknown_architecture_and_unknown_tag_fail():
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        create_clip("no-such-model")
    with pytest.raises(ValueError, match="neither a local file nor an open_clip tag"):
        create_clip("capgap-micro-vit", pretrained="not_a_tag")
    with pytest.raises(FileNotFoundError):
        create_clip("capgap-micro-vit", pretrained="/nonexistent/model.safetensors")


def test_cuda_requested_without_cuda_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        create_clip("capgap-micro-vit", device="cuda")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model, _, _ = create_clip("capgap-micro-vit")
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    torch.manual_seed(1)
    again, _, _ = create_clip("capgap-micro-vit", pretrained=str(path))
    fresh, _, _ = create_clip("capgap-micro-vit")
    assert _same_weights(model, again)
    assert not _same_weights(model, fresh)


def test_torch_checkpoint_round_trip_with_wrapping(tmp_path):
    model, _, _ = create_clip("capgap-micro-vit")
    path = tmp_path / "epoch_1.pt"
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path
    )
    again, _, _ = create_clip("capgap-micro-vit", pretrained=str(path))
    assert _same_weights(model, again)


def test_mismatched_checkpoint_fails(tmp_path):
    small, _, _ = create_clip("capgap-small-vit")
    path = save_checkpoint(small, tmp_path / "small.safetensors")
    with pytest.raises(RuntimeError):
        create_clip("capgap-micro-vit", pretrained=str(path))


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_torch_load_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        load_state_dict(path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        create_clip("capgap-micro-vit", pretrained=str(path))
    assert not marker.exists()


def test_load_run_rebuilds_model(tmp_path):
    model, _, _ = create_clip("capgap-micro-vit", init_logit_bias=-10.0)
    save_checkpoint(model, tmp_path / "model.safetensors")
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump({"model": "capgap-micro-vit", "pretrained": None, "loss": "siglip"})
    )
    again, preprocess, tokenizer = load_run(tmp_path)
    assert _same_weights(model, again)
    assert not again.training
    assert again.logit_bias.item() == pytest.approx(-10.0)
    assert tokenizer(["x"]).shape == (1, 20)


def test_load_run_needs_finished_run(tmp_path):
    (tmp_path / "config.yaml").write_text("model: capgap-micro-vit\n")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_run(tmp_path)


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (20, 20)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_preprocess_shortcut_matches_open_clip_transform(size, mode):
    """The model-size shortcut gives exactly open_clip's eval transform, and others go through it."""
    _, preprocess, _ = create_clip("capgap-micro-vit")
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    ours = preprocess(image.convert("RGB") if mode != "RGB" else image)
    reference = preprocess.transform(image.convert("RGB"))
    assert ours.shape == (3, 32, 32)
    assert torch.equal(ours, reference)


def test_encode_pairs_encodes_then_normalises():
    from capgap.models.clip_embed import encode_pairs

    torch.manual_seed(0)
    model, _, tokenizer = create_clip("capgap-micro-vit")
    model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a red circle", "a square", "a small green star"])
    img, txt = encode_pairs(model, pixels, tokens, normalize=False)
    with torch.no_grad():
        assert torch.equal(img, model.encode_image(pixels).float())
        assert torch.equal(txt, model.encode_text(tokens).float())
    unit_img, unit_txt = encode_pairs(model, pixels, tokens, torch.device("cpu"))
    assert torch.equal(unit_img, torch.nn.functional.normalize(img, dim=-1))
    assert torch.equal(unit_txt, torch.nn.functional.normalize(txt, dim=-1))
    assert unit_img.dtype == unit_txt.dtype == torch.float32
    assert torch.allclose(unit_txt.norm(dim=-1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("name", ["capgap-micro-rn", "capgap-micro-vit"])
def test_text_tower_skips_padding_with_the_same_features_and_gradients(name):
    import open_clip

    torch.manual_seed(0)
    model, _, tokenizer = create_clip(name)
    assert type(model).__name__ == "TrimmedTextCLIP"
    short = tokenizer(["a star", "a red star", "a small red star on a blue background"])
    assert short.argmax(dim=-1).max() + 1 < short.shape[1]  # there is padding to skip
    for tokens in (short, tokenizer(["word " * 40])):  # and a caption cut at the context
        trimmed = model.encode_text(tokens)
        full = open_clip.CLIP.encode_text(model, tokens)
        assert torch.allclose(trimmed, full, atol=1e-5)
    grads = []
    for encode in (model.encode_text, lambda t: open_clip.CLIP.encode_text(model, t)):
        model.zero_grad()
        encode(short).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], rtol=1e-3, atol=1e-3)


def test_text_trim_leaves_a_bidirectional_text_tower_alone():
    import open_clip

    from capgap.models.text_trim import trim_text_padding

    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={
            "context_length": 8,
            "vocab_size": 100,
            "width": 32,
            "heads": 2,
            "layers": 1,
            "no_causal_mask": True,
        },
    )
    assert type(trim_text_padding(model)) is open_clip.CLIP


def test_resnet_tower_is_channels_last_and_saves_contiguous(tmp_path):
    model, _, _ = create_clip("capgap-micro-rn")
    conv = model.visual.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    state = load_state_dict(path)
    assert state["visual.conv1.weight"].is_contiguous()
    assert torch.equal(state["visual.conv1.weight"], conv.detach())
