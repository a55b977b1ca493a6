"""A Beam RunInference ``ModelHandler`` that embeds (image, caption) pairs with CLIP.

The handler is built from a :class:`ClipModelConfig` (no model is loaded at
construction); ``load_model`` builds the model through
:mod:`capgap.models.clip_factory` on the worker: a ``capgap train`` run folder, an
open_clip architecture with a pretrained tag or checkpoint, or a seeded random
init (so every worker process builds the same weights). Each example is a decoded
pair (``pixels``: (H, W, 3) uint8, ``caption``: str, see
:mod:`capgap.transforms.decode`); each prediction holds the L2-normalised image and
text embeddings and the model's temperature. Wrap it in ``KeyedModelHandler`` to
keep the uid attached:

    handler = KeyedModelHandler(ClipModelHandler(ClipModelConfig(device="cuda")))
    embedded = pairs | RunInference(handler)   # (uid, PredictionResult)

A pair may carry ``precomputed_embeddings`` (:data:`PRECOMPUTED`: the prediction of the same
model for it, e.g. from the bank pass) instead of ``pixels``: it passes through with that,
and the model embeds only the others, so rows that skip the model stay in the one stream
(DirectRunner materialises a Flatten of two streams: ~55 us a row). Counter
``embedded_by_model`` counts the pairs the model embedded. When the model raises on a batch,
each pair it held gets ``{FAILED: (type, message)}`` as its inference (``errors/``:
``inference_failed``), and the pairs that carried their embeddings keep them.

``device: cuda`` without CUDA fails loudly in ``load_model`` (no CPU fallback). AMP
(autocast) is used on CUDA when ``amp`` is on; on the CPU ``cpu_bf16`` runs the encoders
in bf16 (opt-in: fast only on CPUs with native bf16 matrix units), and in float32 its
linear layers go through oneDNN on x86-64 (``cpu_matmul``, :mod:`capgap.models.onednn_linear`).
``share_model_across_processes`` and ``model_copies`` are passed to Beam (one model per
machine, shared by the SDK worker processes, through ``multi_process_shared``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from capgap.core.malloc import keep_large_blocks

#: Key of a pair that holds its embeddings already (see the module docstring).
PRECOMPUTED = "precomputed_embeddings"
#: Key of the inference of a pair whose batch the model raised on: (exception type, message).
FAILED = "failed"


def precomputed(image: np.ndarray, text: np.ndarray, logit_scale: float) -> dict[str, Any]:
    """The inference a pair carries under :data:`PRECOMPUTED` (what ``run_inference`` would
    have given it: the embeddings, the scale and whether both are finite)."""
    finite = bool(np.isfinite(image).all() and np.isfinite(text).all())
    return {
        "image_embedding": image,
        "text_embedding": text,
        "logit_scale": logit_scale,
        "finite": finite,
    }


# ClipModelConfig fields that do not change the loaded model.
_NOT_WEIGHTS = frozenset(
    {
        "min_batch_size",
        "max_batch_size",
        "metrics_namespace",
        "model_copies",
        "share_model_across_processes",
    }
)


@dataclass
class ClipModelConfig:
    """Which CLIP to score with and how RunInference batches and places it."""

    name: str = "capgap-micro-vit"  # open_clip or capgap architecture
    pretrained: str | None = None  # open_clip tag or checkpoint file; None: seeded random init
    run_dir: str | None = None  # a `capgap train` run (config.yaml + model.safetensors); wins
    # A transformers CLIP / SigLIP checkpoint (save_pretrained folder or hub id) instead of
    # open_clip; its own image processor and tokenizer come with it (models/hf_clip.py).
    hf_model: str | None = None
    seed: int = 0  # random-init seed, so all workers build identical weights
    device: str = "cpu"  # cpu | cuda | cuda:N; cuda without CUDA is an error
    amp: bool = True  # autocast on CUDA
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    # The encoders in bf16 on the CPU (weights and activations; outputs float32): a ViT-B/32
    # image tower ~4.5x faster on a CPU with AMX (Xeon Sapphire Rapids and later), cosine to
    # float32 >= 0.9999; off by default: a CPU without native bf16 (AVX2 only) emulates it.
    # Not autocast: on the CPU it sends open_clip's nn.MultiheadAttention off its fast path
    # into a linear that copies its weight per token (1.3x slower than float32, measured).
    cpu_bf16: bool = False
    # The float32 encoders' linear layers on the CPU: auto routes them through oneDNN on
    # x86-64 (models/onednn_linear.py: torch's MKL path runs ~half the rate on AMD EPYC; the
    # same features to float32 rounding), onednn requires it, torch keeps torch's layers.
    cpu_matmul: Literal["auto", "onednn", "torch"] = "auto"
    min_batch_size: int = 8
    max_batch_size: int = 256
    share_model_across_processes: bool = False
    model_copies: int | None = None  # models per machine when shared
    metrics_namespace: str = "capgap_clip"
    # torch's and numpy's BLAS threads per worker process (None: their defaults)
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.min_batch_size < 1 or self.max_batch_size < self.min_batch_size:
            raise ValueError("need 1 <= model.min_batch_size <= model.max_batch_size")
        if self.model_copies is not None and self.model_copies < 1:
            raise ValueError("model.model_copies must be >= 1")
        if self.cpu_matmul not in ("auto", "onednn", "torch"):
            raise ValueError(
                f"model.cpu_matmul must be auto, onednn or torch, not {self.cpu_matmul!r}"
            )
        if self.hf_model and self.run_dir:
            raise ValueError(
                "model.hf_model and a capgap run (reference / model.run_dir) both name the "
                "scoring model: give one"
            )

    def autocast_dtype(self, device_type: str) -> str | None:
        """The autocast dtype (``bf16`` / ``fp16``) on a device type, or None (CUDA only)."""
        return self.amp_dtype if self.amp and device_type == "cuda" else None

    def weights_dtype(self, device_type: str) -> str | None:
        """``bf16`` when the encoders' weights are cast to bf16 on this device type, else None
        (float32 weights)."""
        return "bf16" if self.cpu_bf16 and device_type == "cpu" else None

    def weights_key(self) -> tuple:
        """What determines the loaded model (not how RunInference batches, shares or counts it)."""
        return tuple(
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in _NOT_WEIGHTS
        )

    def model_id(self) -> str:
        """A readable identifier of the weights (written into every curated row)."""
        if self.run_dir:
            return f"capgap-run:{Path(self.run_dir).resolve().name}"
        if self.hf_model:
            source = Path(self.hf_model)
            return f"hf:{source.resolve().name if source.is_dir() else self.hf_model}"
        if self.pretrained:
            label = (
                Path(self.pretrained).name if os.path.isfile(self.pretrained) else self.pretrained
            )
            return f"{self.name}/{label}"
        return f"{self.name}/random-init-seed{self.seed}"


def model_input_side(cfg: ClipModelConfig) -> int:
    """The shorter side the scoring model's own preprocessing resizes an image to, read from
    its config (a run's ``config.yaml``, a transformers processor, an open_clip
    architecture): the most pixels of a decoded image the model can use."""
    if cfg.run_dir:
        from capgap.models.clip_factory import input_side, run_architecture

        return input_side(run_architecture(cfg.run_dir)[0])
    if cfg.hf_model:
        from capgap.models.hf_clip import hf_input_side

        return hf_input_side(cfg.hf_model)
    from capgap.models.clip_factory import input_side

    return input_side(cfg.name)


class ClipEmbedder:
    """The loaded model with its preprocess and tokenizer; ``embed`` is all RunInference calls.

    Keeping the whole call in one method lets Beam share a single instance across
    processes (its proxy forwards only ``embed``'s picklable arguments and result).
    """

    def __init__(self, cfg: ClipModelConfig) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        from capgap.core.device import resolve_device
        from capgap.models.onednn_linear import use_onednn_linears, wants_onednn

        self.device = resolve_device(cfg.device)  # raises when CUDA is asked for and absent
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
            # numpy's BLAS (the scores' matrix products) gets the same budget: OpenBLAS keeps
            # a thread per core spinning between calls, otherwise a whole core of CPU time per
            # worker process at one torch thread (measured: 12 of 16 s in a scoring loop).
            threadpool_limits(cfg.torch_threads, user_api="blas")
        if cfg.run_dir:
            from capgap.models.clip_factory import load_run

            model, preprocess, tokenizer = load_run(cfg.run_dir, device=self.device)
        elif cfg.hf_model:
            from capgap.models.hf_clip import load_hf_clip

            model, preprocess, tokenizer = load_hf_clip(cfg.hf_model, device=self.device)
        else:
            # open_clip (and the torchvision / torch._dynamo it imports) costs ~3 s to import:
            # a transformers checkpoint never needs it.
            from capgap.models.clip_factory import create_clip

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model, preprocess, tokenizer = create_clip(
                    cfg.name, cfg.pretrained, device=self.device
                )
        scale = getattr(model, "logit_scale", None)  # read before any bf16 cast rounds it
        self.logit_scale = float(scale.exp().item()) if scale is not None else 100.0
        self.input_dtype = None
        if cfg.weights_dtype(self.device.type) == "bf16":
            model, self.input_dtype = model.to(torch.bfloat16), torch.bfloat16
        # Routed after any bf16 cast: oneDNN's path is for float32 weights (bf16 products go
        # to oneDNN through torch already).
        self.onednn_layers = 0
        if self.device.type == "cpu" and self.input_dtype is None and wants_onednn(cfg.cpu_matmul):
            self.onednn_layers = use_onednn_linears(model)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        amp = cfg.autocast_dtype(self.device.type)
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        device_type = self.device.type
        self._autocast = (
            (lambda: torch.autocast(device_type=device_type, dtype=dtype)) if amp else nullcontext
        )

    def embed(
        self, pixels: Sequence[np.ndarray], captions: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """L2-normalised (image, text) embeddings as float32 arrays, and exp(logit_scale).
        ``captions`` may outnumber ``pixels`` (the gate's two captions an image): each comes
        back in its order."""
        import torch
        from PIL import Image

        from capgap.models.clip_embed import encode_pairs

        images = torch.stack([self.preprocess(Image.fromarray(p, mode="RGB")) for p in pixels])
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        tokens = self.tokenizer(list(captions))
        img, txt = encode_pairs(self.model, images, tokens, self.device, autocast=self._autocast)
        return img.cpu().numpy(), txt.cpu().numpy(), self.logit_scale


# Models loaded in this process, by ClipModelConfig.weights_key(): `capgap curate` runs two
# RunInference steps on the same weights (bank pass, main pass), which then share one copy
# in memory. Weak values: a model goes when no step holds it any more.
_LOADED: weakref.WeakValueDictionary[tuple, ClipEmbedder] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


def load_embedder(cfg: ClipModelConfig) -> ClipEmbedder:
    """The process's ClipEmbedder for these weights, built on first use."""
    key = cfg.weights_key()
    with _LOADED_LOCK:
        embedder = _LOADED.get(key)
        if embedder is None:
            embedder = ClipEmbedder(cfg)
            _LOADED[key] = embedder
    return embedder


class ClipModelHandler(ModelHandler[dict, PredictionResult, ClipEmbedder]):
    """RunInference handler: decoded pair dict -> {image_embedding, text_embedding, logit_scale,
    finite (both embeddings free of NaN / inf)}."""

    def __init__(self, cfg: ClipModelConfig) -> None:
        super().__init__(
            min_batch_size=cfg.min_batch_size,
            max_batch_size=cfg.max_batch_size,
            model_copies=cfg.model_copies if cfg.share_model_across_processes else None,
        )
        self.cfg = cfg
        self._share_across_processes = cfg.share_model_across_processes

    def load_model(self) -> ClipEmbedder:
        keep_large_blocks()  # a remote runner's worker never ran the capgap command
        return load_embedder(self.cfg)

    def run_inference(
        self,
        batch: Sequence[dict],
        model: ClipEmbedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        fresh = [p for p in batch if PRECOMPUTED not in p]
        embedded: Iterator[dict[str, Any]] = iter(())
        if fresh:
            try:
                img, txt, scale = model.embed(
                    [p["pixels"] for p in fresh], [p["caption"] for p in fresh]
                )
            except Exception as err:  # noqa: BLE001 - recorded on every row the model held
                # What RunInference's dead-letter output would do with the whole batch, but
                # the pairs that carry their embeddings (bank, cache) keep them.
                failed = {FAILED: (type(err).__name__, str(err))}
                embedded = (failed for _ in fresh)
            else:
                finite = np.isfinite(img).all(axis=1) & np.isfinite(txt).all(axis=1)
                Metrics.counter(self.cfg.metrics_namespace, "embedded_by_model").inc(len(fresh))
                embedded = (
                    {"image_embedding": i, "text_embedding": t, "logit_scale": scale, "finite": f}
                    for i, t, f in zip(img, txt, finite.tolist(), strict=True)
                )
        model_id = self.cfg.model_id()
        for pair in batch:
            known = pair.get(PRECOMPUTED)
            yield PredictionResult(pair, next(embedded) if known is None else known, model_id)

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(p["pixels"].nbytes + len(p["caption"]) for p in batch if "pixels" in p)

    def get_metrics_namespace(self) -> str:
        return self.cfg.metrics_namespace

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        if inference_args:
            raise ValueError(f"ClipModelHandler takes no inference_args, got {inference_args}")


def _sha256_file(path: str | os.PathLike, digest: Any = None) -> str:
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_hf_folder(folder: Path) -> str:
    """sha256 over a save_pretrained folder's config, weights and processor files, by name."""
    digest = hashlib.sha256()
    patterns = ("*.json", "*.safetensors", "*.bin", "*.txt", "*.model")
    for path in sorted({p for pattern in patterns for p in folder.glob(pattern)}):
        digest.update(f"{path.name}\n".encode())
        _sha256_file(path, digest)
    return digest.hexdigest()


def state_dict_fingerprint(model: Any) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a model's tensors, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\n".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(cfg: ClipModelConfig) -> dict[str, Any]:
    """Identity of the weights: sha256 of the weights file, or of a rebuilt random init."""
    info: dict[str, Any] = {
        "id": cfg.model_id(),
        "architecture": cfg.name,
        "pretrained": cfg.pretrained,
        "run_dir": cfg.run_dir,
        "hf_model": cfg.hf_model,
    }
    if cfg.run_dir:
        weights = Path(cfg.run_dir) / "model.safetensors"
        info["weights"] = str(weights)
        info["sha256"] = _sha256_file(weights)
        import yaml

        with open(Path(cfg.run_dir) / "config.yaml", encoding="utf-8") as fh:
            info["architecture"] = (yaml.safe_load(fh) or {}).get("model", cfg.name)
    elif cfg.hf_model and os.path.isdir(cfg.hf_model):
        info["architecture"] = "transformers"
        info["weights"] = cfg.hf_model
        info["sha256"] = _sha256_hf_folder(Path(cfg.hf_model))
    elif cfg.hf_model:
        info["architecture"] = "transformers"
        info["sha256"] = None  # a hub id: its files are identified by the id
        info["note"] = "Hugging Face hub id; weights identified by name"
    elif cfg.pretrained and os.path.isfile(cfg.pretrained):
        info["weights"] = cfg.pretrained
        info["sha256"] = _sha256_file(cfg.pretrained)
    elif cfg.pretrained:
        info["sha256"] = None  # an open_clip tag: its hub files are identified by the tag
        info["note"] = "open_clip pretrained tag; weights identified by name"
    else:
        embedder = ClipEmbedder(ClipModelConfig(name=cfg.name, seed=cfg.seed, device="cpu"))
        info["sha256"] = state_dict_fingerprint(embedder.model)
        info["note"] = f"random init, seed {cfg.seed}; sha256 of the state dict"
    return info
