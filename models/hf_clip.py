"""Score with a Hugging Face transformers dual encoder: CLIP (``CLIPModel``) or SigLIP
(``SiglipModel``, ``Siglip2Model``), from a local ``save_pretrained`` folder or a hub id.

``load_hf_clip`` returns ``(model, preprocess, tokenizer)`` with the contract of
:func:`capgap.models.clip_factory.create_clip`, so the curate scorer treats both the same:
``model.encode_image`` / ``model.encode_text`` give the projected (unnormalised) features,
``model.logit_scale`` is the log temperature (and ``model.logit_bias`` SigLIP's bias),
``preprocess`` is the checkpoint's own image processor (PIL image -> (3, H, W) tensor) and
``tokenizer`` its own tokenizer, padded to the text model's length (``max_length`` padding,
as SigLIP was trained; CLIP pools at the first end-of-text token, so its padding is inert).

``build_random_hf_clip`` writes a random-init checkpoint folder offline (no hub access): the
transformers config sized as asked, OpenAI CLIP's real BPE tokenizer rebuilt from the
vocabulary open_clip ships, and the family's image processor. Tests and benchmarks use it;
a user scores with a real checkpoint:

    curate --set model.hf_model=openai/clip-vit-base-patch32        # or a local folder
    curate --set model.hf_model=google/siglip-base-patch16-224
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from capgap.core.device import resolve_device
from capgap.models.text_groups import encode_in_length_groups, group_overhead

Family = Literal["clip", "siglip"]


class HFDualEncoder(torch.nn.Module):
    """A transformers CLIP / SigLIP model behind open_clip's ``encode_image`` / ``encode_text``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise ValueError(
                    f"{type(model).__name__} is not a dual encoder (no {method}); "
                    "model.hf_model needs a CLIP or SigLIP checkpoint"
                )
        self.hf = model
        self.logit_scale = model.logit_scale
        # CLIP's text tower is causal and pools one position (the first end-of-text token;
        # with the pre-2023 eos_token_id 2, the highest id, the same token), so the padding
        # columns after each row's pooled position change nothing: a batch runs in groups
        # of similar length, each cut after its longest row's (capgap.models.text_groups),
        # ~4x less text compute for alt-text-length captions padded to 77. SigLIP pools
        # the last position, so its padding stays.
        config = getattr(model, "config", None)
        text_config = getattr(config, "text_config", None)
        self.eos_token_id: int | None = None
        self.text_width = 0
        if getattr(config, "model_type", None) == "clip" and text_config is not None:
            self.eos_token_id = text_config.eos_token_id
            self.text_width = text_config.hidden_size
        if getattr(model, "logit_bias", None) is not None:
            self.logit_bias = model.logit_bias

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        # transformers 5 returns the projected features as pooler_output; 4.x a bare tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._features(self.hf.get_image_features(pixel_values=pixel_values))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        lengths = self.used_lengths(input_ids)
        if lengths is None:
            return self._text_features(input_ids)
        overhead = group_overhead(self.text_width, input_ids.device)
        return encode_in_length_groups(self._text_features, input_ids, lengths, overhead)

    def _text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._features(self.hf.get_text_features(input_ids=input_ids))

    def used_lengths(self, input_ids: torch.Tensor) -> list[int] | None:
        """CLIP: each row's positions up to its pooled one (None: run every position)."""
        if self.eos_token_id is None or input_ids.numel() == 0:
            return None
        if self.eos_token_id == 2:  # as transformers pools these configs: the highest id
            pooled = input_ids.argmax(dim=-1)
        else:
            pooled = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        return (pooled + 1).tolist()


class HFPreprocess:
    """The checkpoint's image processor for one PIL image -> a (3, H, W) float tensor."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFPreprocess({type(self.processor).__name__})"


class HFTokenizer:
    """The checkpoint's tokenizer: list of captions -> (N, length) input ids, max_length padded."""

    def __init__(self, tokenizer: Any, length: int) -> None:
        self.tokenizer, self.length = tokenizer, length

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.length,
            truncation=True,
            return_tensors="pt",
        )["input_ids"]


def _checkpoint_source(path_or_id: str | os.PathLike) -> str:
    """``model.hf_model`` as transformers takes it: a path must be an existing folder (any
    other string is a hub id)."""
    source = str(path_or_id)
    if os.path.sep in source and not os.path.isdir(source):
        raise FileNotFoundError(f"model.hf_model folder not found: {source}")
    return source


def load_hf_clip(
    path_or_id: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[HFDualEncoder, Callable, Callable]:
    """``(model, preprocess, tokenizer)`` from a transformers CLIP / SigLIP checkpoint.

    A local folder is read as is; any other string is a hub id (downloaded by transformers,
    for users with hub access). The model comes back in eval mode on ``device``.
    """
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    source = _checkpoint_source(path_or_id)
    dev = resolve_device(device)
    # CLIP and SigLIP are transformers' own classes: no checkpoint's code is ever run.
    hf = AutoModel.from_pretrained(source, trust_remote_code=False)
    model = HFDualEncoder(hf).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    length = hf.config.text_config.max_position_embeddings
    if 0 < getattr(tokenizer, "model_max_length", length) < length:
        length = tokenizer.model_max_length
    processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=False)
    preprocess = HFPreprocess(processor)
    return model, preprocess, HFTokenizer(tokenizer, length)


def hf_input_side(path_or_id: str | os.PathLike) -> int:
    """The side the checkpoint's image processor resizes images to: CLIP's
    ``shortest_edge``, the larger of SigLIP's ``height`` / ``width`` (read from the
    processor's config; no weights are loaded)."""
    from transformers import AutoImageProcessor

    source = _checkpoint_source(path_or_id)
    size = AutoImageProcessor.from_pretrained(source, trust_remote_code=False).size
    sides = [v for v in dict(size).values() if isinstance(v, int) and v > 0]
    if not sides:
        raise ValueError(f"{source}: the image processor's size {size!r} names no side")
    return max(sides)


def _clip_bpe_files(folder: Path) -> tuple[Path, Path]:
    """OpenAI CLIP's vocab.json / merges.txt, rebuilt from the BPE merges open_clip ships.

    The same construction as open_clip's ``SimpleTokenizer`` (byte alphabet, its ``</w>``
    forms, 48,894 merges, then start / end of text), so the ids equal both open_clip's and
    the hub's ``openai/clip-vit-base-patch32`` tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode

    bpe = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [v + "</w>" for v in alphabet]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_random_hf_clip(
    folder: str | os.PathLike,
    family: Family = "clip",
    *,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    seed: int = 0,
    text_width: int | None = None,
    text_heads: int | None = None,
) -> Path:
    """Write a random-init transformers CLIP or SigLIP checkpoint to ``folder`` (offline).

    Both towers get ``width`` / ``layers`` / ``heads`` unless ``text_width`` /
    ``text_heads`` size the text tower apart (CLIP only: SigLIP's towers share the
    embedding width); the text length is CLIP's 77 or SigLIP's 64. OpenAI's ViT-B/32 is
    ``width=768, layers=12, heads=12, image_size=224, patch_size=32, embed_dim=512,
    text_width=512, text_heads=8``. Returns the folder.
    """
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tower = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    vision = {**tower, "image_size": image_size, "patch_size": patch_size}
    text = {**tower, "vocab_size": 49408}
    if text_width is not None or text_heads is not None:
        if family != "clip":
            raise ValueError("text_width / text_heads size CLIP's text tower only")
        tw = text_width or width
        text.update(
            hidden_size=tw, intermediate_size=4 * tw, num_attention_heads=text_heads or heads
        )
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = _clip_bpe_files(Path(tmp))
        # Positional: transformers 4 names them vocab_file / merges_file, 5 vocab / merges.
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file))
    torch.manual_seed(seed)
    if family == "clip":
        text.update(max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)
        model: torch.nn.Module = CLIPModel(config)
        processor: Any = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size=image_size
        )
    elif family == "siglip":
        # SigLIP has no projection width of its own: the towers' width is the embedding.
        text.update(max_position_embeddings=64, projection_size=width, pad_token_id=49407)
        text.update(bos_token_id=None, eos_token_id=None)  # SigLIP pools the last position
        config = SiglipConfig(text_config=text, vision_config=vision)
        model = SiglipModel(config)
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
        tokenizer.pad_token = "<|endoftext|>"
    else:
        raise ValueError(f"family must be clip or siglip, got {family!r}")
    tokenizer.model_max_length = text["max_position_embeddings"]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
