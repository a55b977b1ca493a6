"""Build CLIP models through open_clip: any architecture by name, weights from a tag or a file.

Architectures are open_clip's own (``ViT-B-32``, ...) plus ours in
``capgap/configs/models/*.json`` (``capgap-micro-vit`` for CPU, ``capgap-small-vit``),
registered with open_clip on first use. ``pretrained`` is either an open_clip
pretrained tag (downloads, for users with hub access) or a local checkpoint: a
``.safetensors`` file, or a torch file read with ``weights_only=True`` (never
unpickles arbitrary objects). The tokenizer's context length follows the config.

    model, preprocess, tokenizer = create_clip("capgap-micro-vit")       # random init, offline
    model, preprocess, tokenizer = create_clip("ViT-B-32", "laion2b_s34b_b79k", device="cuda")
    save_checkpoint(model, "run/model.safetensors")
    model, preprocess, tokenizer = load_run("run")                       # config.yaml + weights
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
import yaml
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from capgap.core.device import resolve_device
from capgap.models.text_trim import trim_text_padding

Tokenizer = Callable[..., torch.Tensor]

# Weights an open_clip model may legitimately lack in a checkpoint when we add them on purpose
# (e.g. fine-tuning a CLIP checkpoint with the SigLIP loss adds a fresh ``logit_bias``).
_OPTIONAL_KEYS = ("logit_bias",)


@functools.cache
def register_model_configs() -> Path:
    """Register ``capgap/configs/models/*.json`` with open_clip (once); returns the folder."""
    folder = Path(str(importlib.resources.files("capgap.configs") / "models"))
    if not folder.is_dir():
        raise FileNotFoundError(f"capgap model config folder missing: {folder}")
    open_clip.add_model_config(folder)
    return folder


def list_architectures() -> list[str]:
    """Every architecture name ``create_clip`` accepts (open_clip's and ours)."""
    register_model_configs()
    return open_clip.list_models()


def is_checkpoint_path(pretrained: str | os.PathLike | None) -> bool:
    """True when ``pretrained`` names a local file rather than an open_clip tag."""
    if pretrained is None:
        return False
    text = str(pretrained)
    return os.path.isfile(text) or text.endswith((".safetensors", ".pt", ".pth", ".bin"))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint file: safetensors, or torch.load(weights_only=True).

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``
    (open_clip training checkpoints); strips a DDP ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        # weights_only=True: only tensors and plain containers; a pickled object payload
        # raises instead of running code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    state = load_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in _OPTIONAL_KEYS]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns 'initialized randomly' before we load a local checkpoint ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    root, flt = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _tag_preprocess_cfg(model_name: str, tag: str | None) -> dict[str, Any]:
    """The image mean/std/interpolation an open_clip tag was trained with (no download)."""
    if tag is None or is_checkpoint_path(tag):
        return {}
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    keys = ("mean", "std", "interpolation", "resize_mode")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


class ClipPreprocess:
    """open_clip's eval transform, with a shortcut for images already at the model's size.

    Resize and centre crop are the identity on an RGB image of exactly the model's input
    size (PIL returns a copy), so such images go straight to a normalised tensor: the same
    values, a third of the time. Synthetic and pre-resized (img2dataset) data hit this path.
    """

    def __init__(self, cfg: PreprocessCfg) -> None:
        self.cfg = cfg
        self.transform = image_transform_v2(cfg, is_train=False)
        self.size = (cfg.size[1], cfg.size[0]) if isinstance(cfg.size, tuple) else (cfg.size,) * 2
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB" or image.size != self.size:
            return self.transform(image)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(image.size[1], image.size[0], 3).permute(2, 0, 1)
        return pixels.float().div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ClipPreprocess(size={self.size}, shortcut at that size; else {self.transform})"


def create_clip(
    model_name: str,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    preprocess_from_tag: str | None = None,
    **model_kwargs: Any,
) -> tuple[torch.nn.Module, Callable, Tokenizer]:
    """Build ``(model, preprocess, tokenizer)``.

    ``pretrained``: None (random init), an open_clip tag such as ``laion2b_s34b_b79k``
    (downloaded by open_clip), or a local ``.safetensors`` / torch checkpoint path.
    ``precision``: open_clip's precision names (``fp32``, ``bf16``, ``fp16``, ``pure_bf16`` ...);
    for mixed-precision training keep ``fp32`` and autocast instead.
    ``preprocess_from_tag``: take image normalisation from this tag's config (used when
    weights come from a file that was fine-tuned from a tag).
    ``model_kwargs`` go to the open_clip model constructor, e.g. ``init_logit_bias=-10.0``.
    """
    register_model_configs()
    dev = resolve_device(device)
    name = model_name
    if open_clip.get_model_config(name) is None and not name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"unknown CLIP architecture {name!r}; capgap models: "
            f"{[m for m in open_clip.list_models() if m.startswith('capgap')]}, "
            "or any open_clip name (open_clip.list_models())"
        )
    local = is_checkpoint_path(pretrained)
    if pretrained is not None and not local:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if str(pretrained) not in tags:
            raise ValueError(
                f"pretrained {str(pretrained)!r} is neither a local file nor an open_clip tag "
                f"for {name} (tags: {tags})"
            )
    tag = None if local or pretrained is None else str(pretrained)
    force_pp = _tag_preprocess_cfg(name, tag or preprocess_from_tag)
    # open_clip warns "No pretrained weights loaded" for every random init; here that is intended.
    quiet = local or pretrained is None
    with _quiet_random_init_warning() if quiet else contextlib.nullcontext():
        model = open_clip.create_model(
            name,
            pretrained=tag,  # the real hub path for tags; local files are loaded below
            precision=precision,
            device=dev,
            force_preprocess_cfg=force_pp or None,
            **model_kwargs,
        )
    if local:
        if not Path(str(pretrained)).is_file():
            raise FileNotFoundError(f"checkpoint not found: {pretrained}")
        _load_weights(model, str(pretrained))
    model = trim_text_padding(model)  # the same features without the batch's unused padding
    if isinstance(model.visual, ModifiedResNet):
        # NHWC is oneDNN's and cuDNN's fast layout for convolutions (a micro ResNet CLIP
        # trains ~17% faster on a CPU); saved weights are made contiguous (save_checkpoint).
        model.visual.to(memory_format=torch.channels_last)
    preprocess = ClipPreprocess(PreprocessCfg(**model.visual.preprocess_cfg))
    tokenizer = open_clip.get_tokenizer(name)  # context length from the config's text_cfg
    return model, preprocess, tokenizer


def input_side(model_name: str) -> int:
    """The side open_clip's eval transform resizes images to for ``model_name`` (its
    ``vision_cfg.image_size``; the larger of the two for a (height, width) size). A
    pretrained tag changes the normalisation, never the size. No weights are built."""
    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown CLIP architecture {model_name!r}")
    size = config["vision_cfg"]["image_size"]
    return int(max(size)) if isinstance(size, (list, tuple)) else int(size)


def run_architecture(run_dir: str | os.PathLike) -> tuple[str, str | None]:
    """``(open_clip architecture, pretrained tag or None)`` of a ``capgap train`` run, from
    its ``config.yaml`` (a checkpoint path there is not a tag)."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run: config.yaml missing")
    with open(config_path, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    if "model" not in cfg:
        raise ValueError(f"{config_path} has no top-level 'model' key")
    pretrained = cfg.get("pretrained")
    tag = None if pretrained is None or is_checkpoint_path(pretrained) else str(pretrained)
    return cfg["model"], tag


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's weights as safetensors (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def load_run(
    run_dir: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Callable, Tokenizer]:
    """Rebuild a trained run: architecture from ``config.yaml``, weights from ``model.safetensors``.

    ``config.yaml`` needs top-level ``model``; a ``pretrained`` tag there only sets the image
    normalisation (the weights in ``model.safetensors`` supersede it; nothing is downloaded).
    The model comes back in eval mode.
    """
    run_dir = Path(run_dir)
    architecture, tag = run_architecture(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished run: {weights.name} missing")
    # A SigLIP-trained model carries logit_bias; build the parameter so the weights fit.
    extra: dict[str, Any] = {}
    with safe_open(str(weights), framework="pt") as fh:
        keys = list(fh.keys())
    if "logit_bias" in keys:
        extra["init_logit_bias"] = 0.0
    model, preprocess, tokenizer = create_clip(
        architecture, str(weights), device=device, preprocess_from_tag=tag, **extra
    )
    model.eval()
    return model, preprocess, tokenizer
