"""CLIP embeddings of decoded pairs through Beam's RunInference; failures become error rows.

:class:`EmbedPairs` runs ``(uid, pair)`` through ``RunInference`` with a keyed
:class:`~capgap.models.clip_handler.ClipModelHandler` (batched, one model per process);
a batch that raises becomes ``inference_failed`` rows in ``errors/``, a pair with a NaN
or inf embedding ``embedding_nonfinite``. A pair that carries its embeddings already
(``precomputed_embeddings``, see the handler) goes through the same step without the model.

    embedded = pairs | EmbedPairs(ClipModelConfig(run_dir="runs/ref"))
    embedded["ok"], embedded["errors"]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from capgap.models.clip_handler import PRECOMPUTED, ClipModelConfig, ClipModelHandler
from capgap.transforms.reasons import Reason, Stage, error_row
from capgap.transforms.schema import ERRORS


def _failed_batch_rows(failed) -> Iterator[dict[str, Any]]:
    batch, exception = failed
    for item in batch:
        _, pair = item if isinstance(item, tuple) else (None, item)
        yield error_row(
            pair, Stage.EMBED, Reason.INFERENCE_FAILED, type(exception).__name__, str(exception)
        )


class _EmbeddedRowFn(beam.DoFn):
    """(uid, PredictionResult) -> the row without pixels, plus embeddings; NaN -> errors."""

    def process(self, element) -> Iterator[Any]:
        uid, result = element
        pair = dict(result.example)
        pair.pop("pixels", None)
        pair.pop(PRECOMPUTED, None)
        inference = result.inference
        img, txt = inference["image_embedding"], inference["text_embedding"]
        if not inference["finite"]:
            yield beam.pvalue.TaggedOutput(
                ERRORS,
                error_row(
                    pair, Stage.EMBED, Reason.EMBEDDING_NONFINITE, "ValueError", "NaN/inf embedding"
                ),
            )
            return
        pair["image_embedding"] = np.asarray(img, dtype=np.float32)
        pair["text_embedding"] = np.asarray(txt, dtype=np.float32)
        pair["logit_scale"] = float(inference["logit_scale"])
        pair["model_id"] = result.model_id
        yield uid, pair


class EmbedPairs(beam.PTransform):
    """(uid, pair) -> tagged ``ok`` (uid, row with embeddings) and ``errors`` rows."""

    def __init__(self, model: ClipModelConfig) -> None:
        super().__init__()
        self.model = model

    def expand(self, pairs):
        handler = KeyedModelHandler(ClipModelHandler(self.model))
        main, dlq = pairs | "RunInference" >> RunInference(handler).with_exception_handling()
        failed = dlq.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
        rows = main | "Rows" >> beam.ParDo(_EmbeddedRowFn()).with_outputs(ERRORS, main="ok")
        errors = (failed, rows[ERRORS]) | "EmbedErrors" >> beam.Flatten()
        return {"ok": rows.ok, ERRORS: errors}
