"""Beam ``ModelHandler``s for recaptioning: the captioner, and the CLIP quality gate.

``RecaptionModelHandler`` takes row dicts (``image`` = encoded image bytes,
``caption`` = the original caption) in batches and returns one
``PredictionResult(example=row, inference=new_caption, model_id=source)`` per
row. The captioner (``capgap.models.captioner``) is loaded in ``load_model``,
never at construction, so the handler pickles cheaply to workers;
``share_model_across_processes=True`` loads one copy per machine (Beam's
``large_model``), which is what a multi-GB VLM on one GPU wants.

``CaptionGateModelHandler`` takes ``(row, new_caption)`` pairs and returns the
reference CLIP's cosine of the image with the new and with the original caption
(``GateScores``), through the process's ``ClipEmbedder`` for its ``ClipModelConfig`` (the
CLIP run, with the scoring model's precision: autocast on CUDA, ``cpu_bf16``; one copy in
memory when it is the scoring model). Both decode images with
``capgap.core.images.rgb_image``: a row that does not decode fails its batch with a
``ValueError`` naming the row's uid.

    handler = RecaptionModelHandler(CaptionerConfig(model="runs/captioner"), max_batch_size=32)
    rows | RunInference(KeyedModelHandler(handler))        # on (uid, row) pairs
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from capgap.core.images import rgb_image
from capgap.core.malloc import keep_large_blocks
from capgap.models.captioner import Captioner, CaptionerConfig, load_captioner
from capgap.models.clip_handler import ClipModelConfig, load_embedder


def _what(row: dict) -> str:
    """How a decode error names its row (``rgb_image``'s ``what``)."""
    return f"row {row['uid']}" if "uid" in row else "image"


def _batching(
    min_batch_size: int | None, max_batch_size: int | None, max_batch_duration_secs: int | None
) -> dict[str, Any]:
    if (
        min_batch_size is not None
        and max_batch_size is not None
        and min_batch_size > max_batch_size
    ):
        raise ValueError("min_batch_size must not exceed max_batch_size")
    return {
        "min_batch_size": min_batch_size,
        "max_batch_size": max_batch_size,
        "max_batch_duration_secs": max_batch_duration_secs,
    }


class RecaptionModelHandler(ModelHandler[dict, PredictionResult, Captioner]):
    """Batched captioning of row dicts with any ``Captioner``."""

    def __init__(
        self,
        captioner: CaptionerConfig,
        *,
        min_batch_size: int | None = 1,
        max_batch_size: int | None = None,
        max_batch_duration_secs: int | None = None,
        share_model_across_processes: bool = False,
        image_key: str = "image",
        caption_key: str = "caption",
    ) -> None:
        super().__init__(
            **_batching(
                min_batch_size,
                max_batch_size if max_batch_size is not None else captioner.batch_size,
                max_batch_duration_secs,
            ),
            large_model=share_model_across_processes,
        )
        self.captioner_config = captioner
        self.image_key = image_key
        self.caption_key = caption_key
        self._share = share_model_across_processes

    def load_model(self) -> Captioner:
        keep_large_blocks()  # a remote runner's worker never ran the capgap command
        return load_captioner(self.captioner_config)

    def run_inference(
        self,
        batch: Sequence[dict],
        model: Captioner,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        images = [rgb_image(row[self.image_key], _what(row)) for row in batch]
        contexts = [row.get(self.caption_key) or "" for row in batch]
        captions = model.caption(images, contexts)
        return [
            PredictionResult(example=row, inference=text, model_id=model.source)
            for row, text in zip(batch, captions, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(row[self.image_key]) for row in batch)

    def get_metrics_namespace(self) -> str:
        return "capgap_recaption"

    def share_model_across_processes(self) -> bool:
        return self._share


@dataclass(frozen=True)
class GateScores:
    """Reference-CLIP cosines of one image with its new and its original caption."""

    new: float
    original: float


def gate_clip(
    clip_run: str, device: str = "cpu", precision_of: ClipModelConfig | None = None
) -> ClipModelConfig:
    """The gate's CLIP: the run at ``clip_run`` on ``device``, with the autocast, bf16 and
    thread settings of ``precision_of`` (the scoring model's; default ClipModelConfig's)."""
    base = precision_of if precision_of is not None else ClipModelConfig()
    return dataclasses.replace(
        base,
        run_dir=clip_run,
        hf_model=None,
        device=device,
        metrics_namespace="capgap_recaption_gate",
        share_model_across_processes=False,
        model_copies=None,
    )


class _ClipScorer:
    """A loaded CLIP: cos(image, caption) for batches of pairs."""

    def __init__(self, clip: ClipModelConfig) -> None:
        self.embedder = load_embedder(clip)

    def scores(self, images: Sequence[Any], new: Sequence[str], original: Sequence[str]):
        img, txt, _ = self.embedder.embed([np.asarray(im) for im in images], [*new, *original])
        n = len(images)
        cos_new = (img * txt[:n]).sum(-1).tolist()
        cos_original = (img * txt[n:]).sum(-1).tolist()
        return [GateScores(a, b) for a, b in zip(cos_new, cos_original, strict=True)]


class CaptionGateModelHandler(ModelHandler[tuple, GateScores, Any]):
    """Scores ``(row, new_caption, ...)`` tuples with a CLIP run: ``clip`` is a run folder
    (float32 on ``device``) or a :func:`gate_clip` config."""

    def __init__(
        self,
        clip: str | ClipModelConfig,
        *,
        device: str = "cpu",
        min_batch_size: int | None = 1,
        max_batch_size: int | None = 64,
        max_batch_duration_secs: int | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
    ) -> None:
        super().__init__(**_batching(min_batch_size, max_batch_size, max_batch_duration_secs))
        self.clip = gate_clip(clip, device) if isinstance(clip, str) else clip
        self.clip_run = self.clip.run_dir
        self.image_key = image_key
        self.caption_key = caption_key

    def load_model(self) -> _ClipScorer:
        keep_large_blocks()
        return _ClipScorer(self.clip)

    def run_inference(
        self,
        batch: Sequence[tuple],
        model: _ClipScorer,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        images = [rgb_image(item[0][self.image_key], _what(item[0])) for item in batch]
        new = [item[1] for item in batch]
        original = [item[0].get(self.caption_key) or "" for item in batch]
        scores = model.scores(images, new, original)
        return [
            PredictionResult(example=pair, inference=score, model_id=self.clip_run)
            for pair, score in zip(batch, scores, strict=True)
        ]

    def get_num_bytes(self, batch: Sequence[tuple]) -> int:
        return sum(len(item[0][self.image_key]) for item in batch)

    def get_metrics_namespace(self) -> str:
        return "capgap_recaption_gate"
