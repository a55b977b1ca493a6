"""CLIP embeddings of decoded pairs through Beam's RunInference; failures become error rows.

:class:`EmbedPairs` runs ``(uid, pair)`` through ``RunInference`` with a keyed
:class:`~capgap.models.clip_handler.ClipModelHandler` (batched, one model per process);
a batch that raises becomes ``inference_failed`` rows in ``errors/``, a pair with a NaN
or inf embedding ``embedding_nonfinite``. A pair that carries its embeddings already
(``precomputed_embeddings``, see the handler) goes through the same step without the model
and keeps them when the model fails on the others of its batch.

    embedded = pairs | EmbedPairs(ClipModelConfig(run_dir="runs/ref"))
    embedded["ok"], embedded["errors"]
    embedded["new"]   # with new_rows=True: the ok rows whose embeddings the cache lacks
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from capgap.models.clip_handler import FAILED, PRECOMPUTED, ClipModelConfig, ClipModelHandler
from capgap.transforms.reasons import Reason, Stage, error_row
from capgap.transforms.schema import ERRORS

#: EmbedPairs' output of the ok rows whose embeddings did not come from the cache.
NEW = "new"
#: Key of a precomputed inference that came from the build cache (no new cache entry).
CACHED = "cached"


def _failed_batch_rows(failed) -> Iterator[dict[str, Any]]:
    batch, exception = failed
    for item in batch:
        _, pair = item if isinstance(item, tuple) else (None, item)
        yield error_row(
            pair, Stage.EMBED, Reason.INFERENCE_FAILED, type(exception).__name__, str(exception)
        )


class _EmbeddedRowFn(beam.DoFn):
    """(uid, PredictionResult) -> the row without pixels, plus embeddings; NaN and failed
    batches -> errors; ``new_rows``: the ok rows not from the cache also tagged ``new``."""

    def __init__(self, new_rows: bool = False) -> None:
        self.new_rows = new_rows

    def process(self, element) -> Iterator[Any]:
        uid, result = element
        pair = dict(result.example)
        pair.pop("pixels", None)
        pair.pop(PRECOMPUTED, None)
        inference = result.inference
        if FAILED in inference:
            kind, message = inference[FAILED]
            yield beam.pvalue.TaggedOutput(
                ERRORS, error_row(pair, Stage.EMBED, Reason.INFERENCE_FAILED, kind, message)
            )
            return
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
        if self.new_rows and not inference.get(CACHED, False):
            yield beam.pvalue.TaggedOutput(NEW, (uid, pair))
        yield uid, pair


class EmbedPairs(beam.PTransform):
    """(uid, pair) -> tagged ``ok`` (uid, row with embeddings) and ``errors`` rows; with
    ``new_rows``, also ``new``: the ok rows whose embeddings did not come from the cache
    (the model's and the bank's), the ones a build writes cache entries for."""

    def __init__(self, model: ClipModelConfig, new_rows: bool = False) -> None:
        super().__init__()
        self.model, self.new_rows = model, new_rows

    def expand(self, pairs):
        handler = KeyedModelHandler(ClipModelHandler(self.model))
        main, dlq = pairs | "RunInference" >> RunInference(handler).with_exception_handling()
        failed = dlq.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_rows)
        tags = (ERRORS, NEW) if self.new_rows else (ERRORS,)
        rows = main | "Rows" >> beam.ParDo(_EmbeddedRowFn(self.new_rows)).with_outputs(
            *tags, main="ok"
        )
        errors = (failed, rows[ERRORS]) | "EmbedErrors" >> beam.Flatten()
        out = {"ok": rows.ok, ERRORS: errors}
        if self.new_rows:
            out[NEW] = rows[NEW]
        return out
