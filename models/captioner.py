"""Captioners: one interface, a Hugging Face transformers backend, and the embedded default.

``Captioner.caption(images, contexts)`` turns PIL images (and, optionally, each
image's original caption for prompts that use ``{caption}``) into one caption
each. ``HFCaptioner`` runs any transformers image-to-text or image-text-to-text
model from a hub id or a local directory through the Auto classes:

* model class: ``AutoModelForImageTextToText`` (BLIP, BLIP-2, GIT, Florence-2,
  SmolVLM / Idefics3, Qwen2-VL, LLaVA, PaliGemma, VisionEncoderDecoder, ...),
  else ``AutoModelForVision2Seq`` where the installed transformers still has it,
  else ``AutoModelForCausalLM`` (remote-code VLMs); chosen from the checkpoint's
  config, or forced with ``auto_class``;
* inputs: ``AutoProcessor`` (falling back to ``AutoImageProcessor`` +
  ``AutoTokenizer`` for checkpoints that save only the parts); the prompt
  template goes through the processor's chat template when it has one (chat
  VLMs), verbatim otherwise (BLIP's "a picture of", Florence-2's task tokens);
* generation settings, batching, dtype and device from ``CaptionerConfig``;
  ``trust_remote_code`` stays off unless asked; asking for CUDA without CUDA
  raises instead of falling back to CPU.

The embedded default (``capgap train-captioner``, see
``capgap.models.tiny_captioner``) is a local HF directory and loads through this
same path. ``Captioner.source`` = ``"<model id or path>@<fingerprint>"`` names
the weights for ``caption_source`` columns and manifests.

    captioner = load_captioner(CaptionerConfig(model="runs/captioner"))
    captioner.caption([Image.open("x.png")])          # ['a small red striped star ...']
    load_captioner(CaptionerConfig(model="HuggingFaceTB/SmolVLM-256M-Instruct",
                                   prompt="Describe this image in one sentence.",
                                   device="cuda", dtype="bfloat16"))
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from capgap.core.device import resolve_device

# Files whose bytes are hashed in full; larger ones are hashed by size + first/last chunk.
_FULL_HASH_LIMIT = 64 * 1024 * 1024
_EDGE_BYTES = 4 * 1024 * 1024
_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class CaptionerConfig:
    """How to load and run a captioning model (the ``captioner`` section of configs)."""

    backend: Literal["hf"] = "hf"
    # Hub id ("Salesforce/blip-image-captioning-base") or a local directory (HF format).
    model: str = "runs/captioner"
    revision: str | None = None
    # auto: pick from the checkpoint's config. Or force one Auto class.
    auto_class: Literal["auto", "image-text-to-text", "vision2seq", "causal-lm"] = "auto"
    # Prompt template; "{caption}" is replaced by the pair's original caption. Empty: none.
    prompt: str = ""
    # auto: wrap the prompt in the processor's chat template when it has one.
    chat_template: Literal["auto", "always", "never"] = "auto"
    max_new_tokens: int = 48
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    dtype: str = "float32"  # auto | float32 | float16 | bfloat16
    device: str = "cpu"  # cpu | cuda | cuda:N | mps | auto
    torch_threads: int | None = None  # intra-op CPU threads per process (None: torch's default)
    trust_remote_code: bool = False
    # Never reach the hub (always true for local directories).
    local_files_only: bool = False
    attn_implementation: str | None = None
    # Remove a leading copy of the prompt from the generated text (BLIP-style models echo it).
    strip_prompt: bool = True
    max_caption_chars: int = 2000

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("captioner model must name a hub id or a local directory")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("batch_size, max_new_tokens and num_beams must be >= 1")
        if self.max_caption_chars < 1:
            raise ValueError("max_caption_chars must be >= 1")


class Captioner(abc.ABC):
    """Images in, one caption per image out."""

    name: str
    fingerprint: str
    batch_size: int = 16

    @property
    def source(self) -> str:
        """``"<name>@<fingerprint>"``: what ``caption_source`` records."""
        return f"{self.name}@{self.fingerprint}"

    @abc.abstractmethod
    def caption_batch(self, images: Sequence[Any], contexts: Sequence[str] | None) -> list[str]:
        """Caption one batch (as large as the caller chose)."""

    def caption(self, images: Sequence[Any], contexts: Sequence[str] | None = None) -> list[str]:
        """Caption ``images`` in batches of ``batch_size``; ``contexts`` feed ``{caption}``."""
        if contexts is not None and len(contexts) != len(images):
            raise ValueError(f"{len(images)} images but {len(contexts)} contexts")
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            out.extend(
                self.caption_batch(
                    images[start:stop], None if contexts is None else contexts[start:stop]
                )
            )
        return out


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        return "auto"
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def fingerprint_dir(path: str | os.PathLike) -> str:
    """A short content hash of a model directory (file names, sizes and bytes)."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(file, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_EDGE_BYTES))
                fh.seek(size - _EDGE_BYTES)
                digest.update(fh.read(_EDGE_BYTES))
    return digest.hexdigest()[:16]


def _auto_classes() -> dict[str, Any]:
    """The model Auto classes this transformers has, by ``auto_class`` name."""
    import transformers

    classes = {}
    for key, attr in (
        ("image-text-to-text", "AutoModelForImageTextToText"),
        ("vision2seq", "AutoModelForVision2Seq"),  # removed in transformers 5
        ("causal-lm", "AutoModelForCausalLM"),
    ):
        cls = getattr(transformers, attr, None)
        if cls is not None:
            classes[key] = cls
    return classes


def pick_auto_class(config: Any, wanted: str = "auto") -> Any:
    """The Auto class that builds ``config``'s model: image-text-to-text or vision2seq when
    they map it (natively or via the config's ``auto_map``), causal-lm only via ``auto_map``
    (remote-code VLMs), unless ``wanted`` names one."""
    classes = _auto_classes()
    if wanted != "auto":
        if wanted not in classes:
            raise ValueError(f"auto_class {wanted!r} does not exist in this transformers")
        return classes[wanted]
    auto_map = getattr(config, "auto_map", None) or {}
    for key, cls in classes.items():
        # A native causal-LM mapping means a text-only model; only remote code counts there.
        native = key != "causal-lm" and type(config) in cls._model_mapping
        if native or cls.__name__ in auto_map:
            return cls
    raise ValueError(
        f"no image-to-text Auto class knows model type {getattr(config, 'model_type', '?')!r} "
        f"(tried {', '.join(c.__name__ for c in classes.values())}); set auto_class, or "
        "trust_remote_code for checkpoints that ship their own code"
    )


class _ProcessorParts:
    """Image processor + tokenizer loaded separately (checkpoints without a processor config)."""

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = None

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True, **kwargs):
        from transformers import BatchFeature

        data = dict(self.image_processor(images, return_tensors=return_tensors))
        if text is not None:
            data.update(self.tokenizer(text, return_tensors=return_tensors, padding=padding))
        return BatchFeature(data)


class HFCaptioner(Captioner):
    """Any transformers image(-text)-to-text model, from a hub id or a local directory."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        import torch
        import transformers

        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.device = resolve_device(cfg.device)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        local = Path(cfg.model).is_dir()
        if not local and cfg.model.startswith((".", "/", "~")):
            raise FileNotFoundError(f"captioner directory {cfg.model!r} does not exist")
        load_kwargs: dict[str, Any] = {
            "trust_remote_code": cfg.trust_remote_code,
            "local_files_only": local or cfg.local_files_only,
        }
        if cfg.revision is not None and not local:
            load_kwargs["revision"] = cfg.revision

        config = transformers.AutoConfig.from_pretrained(cfg.model, **load_kwargs)
        auto_cls = pick_auto_class(config, cfg.auto_class)
        model_kwargs = dict(load_kwargs)
        dtype = resolve_dtype(cfg.dtype)
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model_kwargs[dtype_key] = dtype
        if cfg.attn_implementation:
            model_kwargs["attn_implementation"] = cfg.attn_implementation
        self.model = auto_cls.from_pretrained(cfg.model, **model_kwargs)
        self.model.to(self.device)
        self.model.eval()
        self.dtype = next(self.model.parameters()).dtype
        self.processor = self._load_processor(load_kwargs)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"{cfg.model}: the processor has no tokenizer to decode captions with")
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        if not self.encoder_decoder and cfg.prompt:
            # Decoder-only VLMs continue the prompt: pad on the left so batches line up.
            self.tokenizer.padding_side = "left"
        self.use_chat = cfg.chat_template == "always" or (
            cfg.chat_template == "auto"
            and bool(cfg.prompt)
            and bool(getattr(self.processor, "chat_template", None))
        )
        if self.use_chat and not getattr(self.processor, "chat_template", None):
            raise ValueError(f"{cfg.model}: chat_template=always but the processor has none")
        self.name = cfg.model
        commit = getattr(config, "_commit_hash", None)
        self.fingerprint = (
            fingerprint_dir(cfg.model) if local else (commit or cfg.revision or "unpinned")[:16]
        )
        self._torch = torch

    def _load_processor(self, load_kwargs: dict[str, Any]) -> Any:
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        processor = AutoProcessor.from_pretrained(self.cfg.model, **load_kwargs)
        has_images = hasattr(processor, "image_processor") or hasattr(processor, "pixel_mean")
        has_text = hasattr(processor, "tokenizer")
        if has_images and has_text:
            return processor
        # Only one half came back (e.g. a VisionEncoderDecoder saved without a processor).
        image_processor = AutoImageProcessor.from_pretrained(self.cfg.model, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(self.cfg.model, **load_kwargs)
        return _ProcessorParts(image_processor, tokenizer)

    # --- prompts ---------------------------------------------------------------------------

    def _prompt_text(self, context: str | None) -> str:
        return self.cfg.prompt.replace("{caption}", context or "")

    def _render_prompt(self, text: str) -> str:
        if not self.use_chat:
            return text
        content: list[dict[str, str]] = [{"type": "image"}]
        if text:
            content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def _inputs(self, images: Sequence[Any], prompts: list[str]) -> Any:
        if not self.cfg.prompt and not self.use_chat:
            return self.processor(images=list(images), return_tensors="pt")
        texts = [self._render_prompt(p) for p in prompts]
        # Chat VLMs take a list of images per sample; single-image models a flat list.
        batch_images = [[im] for im in images] if self.use_chat else list(images)
        return self.processor(images=batch_images, text=texts, return_tensors="pt", padding=True)

    # --- generation ------------------------------------------------------------------------

    def generation_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        kwargs: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "num_beams": cfg.num_beams,
            "do_sample": cfg.do_sample,
        }
        if cfg.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = cfg.repetition_penalty
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        kwargs.update(cfg.generate_kwargs)
        return kwargs

    def caption_batch(self, images: Sequence[Any], contexts: Sequence[str] | None) -> list[str]:
        if not images:
            return []
        torch = self._torch
        prompts = [
            self._prompt_text(None if contexts is None else c)
            for c in (contexts or [None] * len(images))
        ]
        inputs = self._inputs(images, prompts)
        tensors = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            tensors[key] = value
        with torch.inference_mode():
            sequences = self.model.generate(**tensors, **self.generation_kwargs())
        input_ids = tensors.get("input_ids")
        if (
            not self.encoder_decoder
            and isinstance(input_ids, torch.Tensor)
            and sequences.shape[1] >= input_ids.shape[1]
            and torch.equal(sequences[:, : input_ids.shape[1]].cpu(), input_ids.cpu())
        ):
            sequences = sequences[:, input_ids.shape[1] :]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [self._clean(t, p) for t, p in zip(texts, prompts, strict=True)]

    def _clean(self, text: str, prompt: str) -> str:
        text = " ".join(text.split())
        stem = " ".join(prompt.split())
        if self.cfg.strip_prompt and stem and text.lower().startswith(stem.lower()):
            text = text[len(stem) :].lstrip(" :,.-")
        text = re.sub(r"\s+([,.;:!?])", r"\1", text)
        return text[: self.cfg.max_caption_chars].strip()


def load_captioner(cfg: CaptionerConfig) -> Captioner:
    """Build the captioner ``cfg`` names (loads weights: call in ``load_model``/``setup``)."""
    if cfg.backend == "hf":
        return HFCaptioner(cfg)
    raise ValueError(f"unknown captioner backend {cfg.backend!r}")
