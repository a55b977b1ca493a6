"""The foundation helpers (files, images, device) and the shared optimiser / schedule."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from capgap.core.device import resolve_device
from capgap.core.files import expand_paths
from capgap.core.images import rgb_image
from capgap.models.optim import lr_at, make_adamw

# --- expand_paths -------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """a/{1,2}.parquet, a/notes.txt, a/sub/3.parquet, b/4.parquet."""
    for rel in ("a/1.parquet", "a/2.parquet", "a/notes.txt", "a/sub/3.parquet", "b/4.parquet"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return tmp_path


def test_folder_stands_for_the_shards_directly_inside(tree):
    assert expand_paths(str(tree / "a")) == [tree / "a/1.parquet", tree / "a/2.parquet"]
    assert expand_paths(tree / "a", suffix=".txt") == [tree / "a/notes.txt"]


def test_comma_list_mixes_files_folders_and_globs_sorted_without_duplicates(tree):
    got = expand_paths(f"{tree / 'b'} , {tree / 'a/2.parquet'},{tree / 'a/*.parquet'}")
    assert got == [tree / "a/1.parquet", tree / "a/2.parquet", tree / "b/4.parquet"]
    assert expand_paths([str(tree / "b"), str(tree / "a/1.parquet")]) == [
        tree / "a/1.parquet",
        tree / "b/4.parquet",
    ]


def test_double_star_globs_recurse(tree):
    assert expand_paths(str(tree / "**/*.parquet")) == [
        tree / "a/1.parquet",
        tree / "a/2.parquet",
        tree / "a/sub/3.parquet",
        tree / "b/4.parquet",
    ]


def test_a_pattern_matching_nothing_is_named(tree):
    missing = str(tree / "none-*.parquet")
    with pytest.raises(FileNotFoundError, match="no Parquet files match .*none-"):
        expand_paths(f"{tree / 'a'},{missing}")
    with pytest.raises(FileNotFoundError, match="no csv files match"):
        expand_paths(str(tree / "a"), suffix=".csv")
    assert expand_paths(missing, allow_empty=True) == []


# --- rgb_image ----------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (8, 6), (10, 20, 30, 128)),
        Image.new("P", (8, 6), 3),
        Image.new("L", (8, 6), 77),
        Image.new("RGB", (8, 6), (1, 2, 3)),
    ],
    ids=["RGBA", "P", "L", "RGB"],
)
def test_rgb_image_converts_every_mode_like_pil(image):
    out = rgb_image(_encode(image))
    assert out.mode == "RGB" and out.size == (8, 6)
    expected = Image.open(io.BytesIO(_encode(image))).convert("RGB")
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_rgb_image_names_what_failed():
    with pytest.raises(ValueError, match=r"^pair u-7: image does not decode"):
        rgb_image(b"not an image", what="pair u-7")
    truncated = _encode(Image.new("RGB", (64, 64), (9, 9, 9)))[:40]
    with pytest.raises(ValueError, match="row 3"):
        rgb_image(truncated, what="row 3")


# --- resolve_device -----------------------------------------------------------------------------


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_resolve_device_cuda_without_cuda_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_device("cuda:1")


# --- models.optim -------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)  # weight decays, bias does not
        self.ln_1 = torch.nn.LayerNorm(4)  # 1-D: no decay
        self.norm_mat = torch.nn.Parameter(torch.zeros(2, 2))  # 2-D, "norm" in its name
        self.bn_mat = torch.nn.Parameter(torch.zeros(2, 2))  # 2-D, "bn" in its name
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))
        self.frozen = torch.nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def _group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]


def test_make_adamw_groups_by_the_clip_rule_by_default():
    model = _Net()
    opt = make_adamw(model, lr=0.1, weight_decay=0.2, eps=1e-6)
    no_decay, decay = _group_names(model, opt)
    assert decay == {"proj.weight", "norm_mat"}
    assert no_decay == {"proj.bias", "ln_1.weight", "ln_1.bias", "bn_mat", "logit_scale"}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.2]
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_make_adamw_takes_other_no_decay_keys():
    model = _Net()
    opt = make_adamw(model, lr=0.1, weight_decay=0.01, eps=1e-8, no_decay_keys=("norm", "ln_"))
    no_decay, decay = _group_names(model, opt)
    assert decay == {"proj.weight", "bn_mat"}
    assert no_decay == {"proj.bias", "ln_1.weight", "ln_1.bias", "norm_mat", "logit_scale"}
    assert opt.defaults["eps"] == 1e-8


def test_make_adamw_is_fused_on_cpu_and_steps_like_the_per_tensor_adamw():
    torch.manual_seed(0)
    fused_net, plain_net = _Net(), _Net()
    plain_net.load_state_dict(fused_net.state_dict())
    fused = make_adamw(fused_net, lr=0.1, weight_decay=0.2)
    plain = make_adamw(plain_net, lr=0.1, weight_decay=0.2)
    for group in plain.param_groups:
        group["fused"] = False
    assert fused.defaults["fused"] is True
    for net, opt in ((fused_net, fused), (plain_net, plain)):
        for _ in range(3):
            opt.zero_grad()
            sum((p**2).sum() * (i + 1) for i, p in enumerate(net.parameters())).backward()
            opt.step()
    for (name, a), b in zip(
        fused_net.state_dict().items(), plain_net.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    lr = [lr_at(s, 20, 2.0, warmup_steps=4, min_lr_ratio=0.1) for s in range(25)]
    assert lr[0] == 0.5  # step 0 already moves: lr * 1 / warmup
    assert lr[3] == 2.0  # end of warmup: the peak
    assert lr[4] == 2.0  # first cosine step starts at the peak
    assert lr[12] == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[20] == pytest.approx(0.2) and lr[24] == lr[20]  # floor at total_steps, held
    assert all(a >= b for a, b in zip(lr[3:], lr[4:], strict=False))


def test_lr_warmup_clamping():
    # clamped (the CLIP trainer): a warmup longer than the run is cut so the last step decays
    clamped = [lr_at(s, 5, 1.0, warmup_steps=10) for s in range(5)]
    assert clamped[:4] == [0.25, 0.5, 0.75, 1.0] and clamped[4] == 1.0
    # not clamped (the captioner): the warmup runs on past the end of the run
    raw = [lr_at(s, 5, 1.0, warmup_steps=10, clamp_warmup=False) for s in range(5)]
    assert raw == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert lr_at(0, 1, 1.0, warmup_steps=10) == 1.0  # a one-step run: no warmup left
