"""``Recaption``: the PTransform that rewrites terse captions with a captioning model.

Interface (what ``capgap curate`` wires in after its decide step):

* input: a PCollection of row dicts with at least ``uid`` (stable, unique),
  ``image`` (validated encoded image bytes) and ``caption`` (str); every other
  key (``clip_score``, ``certainty``, ``imbalance``, labels, ...) is carried
  through unchanged;
* output: one row dict per input row, with the input keys plus
  - ``original_caption``: the input ``caption``;
  - ``cfg.output_column`` (default ``caption``, i.e. replaced in place): the
    dense caption, or the original when it was not accepted. With another
    output column, ``caption`` keeps the original;
  - ``caption_source``: ``"<model id or path>@<fingerprint>"`` when the dense
    caption was kept, ``"original"`` otherwise;
  - ``recaption_status``: ``recaptioned`` | ``kept_original_empty`` (the model
    wrote nothing) | ``kept_original_gate`` (the quality gate found the new
    caption less aligned with the image than the original) |
    ``kept_original_error`` (the captioner or gate raised on the row's batch;
    ``on_error: keep_original``, the default; ``fail`` stops the pipeline);
  - ``recaption_error``: ``"<ExceptionType>: <message>"`` for that last case, else None;
  - ``gate_clip_score_new`` / ``gate_clip_score_original``: the reference
    CLIP's cosine of the image with each caption (None without the gate).

The quality gate (``gate.enabled``) re-scores both captions with the reference
CLIP run (``gate.clip_run``, loaded by ``clip_factory.load_run``) and keeps the
original when ``new < original - gate.margin``. Beam metrics: counter
``capgap_recaption/<status>`` per row. A trainer that mixes dense and original
captions with probability p reads ``caption`` and ``original_caption``.

    curated = rows | "Recaption" >> Recaption(RecaptionConfig(
        captioner=CaptionerConfig(model="runs/captioner"),
        gate=GateConfig(enabled=True, clip_run="runs/reference-clip")))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference

from capgap.models.captioner import CaptionerConfig
from capgap.models.clip_handler import ClipModelConfig
from capgap.models.recaption_handler import (
    CaptionGateModelHandler,
    GateScores,
    RecaptionModelHandler,
    gate_clip,
)
from capgap.transforms.cache import (
    CAPTIONS,
    GATE,
    HIT,
    MISS,
    LookUp,
    Space,
    caption_key,
    gate_key,
)

ORIGINAL_COLUMN = "original_caption"
SOURCE_COLUMN = "caption_source"
STATUS_COLUMN = "recaption_status"
GATE_NEW_COLUMN = "gate_clip_score_new"
GATE_ORIGINAL_COLUMN = "gate_clip_score_original"
ORIGINAL_SOURCE = "original"
ERROR_COLUMN = "recaption_error"
STATUSES: tuple[str, ...] = (
    "recaptioned",
    "kept_original_empty",
    "kept_original_gate",
    "kept_original_error",
)
METRICS_NAMESPACE = "capgap_recaption"


@dataclass
class GateConfig:
    """Keep the original caption when the new one is less aligned with the image."""

    enabled: bool = False
    clip_run: str | None = None  # reference CLIP run folder (config.yaml + model.safetensors)
    margin: float = 0.0  # keep original when cos(new) < cos(original) - margin
    device: str = "cpu"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.enabled and not self.clip_run:
            raise ValueError("gate.enabled needs gate.clip_run (a reference CLIP run folder)")
        if self.batch_size < 1:
            raise ValueError("gate.batch_size must be >= 1")


@dataclass
class RecaptionConfig:
    """Settings of the recaption stage (the ``recaption`` section of configs/captioner.yaml)."""

    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    output_column: str = "caption"
    min_batch_size: int = 1
    max_batch_size: int | None = None  # default: captioner.batch_size
    max_batch_duration_secs: int | None = None
    share_model_across_processes: bool = False
    # keep_original: a batch the captioner (or gate) fails on keeps its captions, status
    # kept_original_error; fail: the exception stops the pipeline.
    on_error: Literal["keep_original", "fail"] = "keep_original"
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        reserved = {ORIGINAL_COLUMN, SOURCE_COLUMN, STATUS_COLUMN, ERROR_COLUMN, "uid", "image"}
        if self.output_column in reserved:
            raise ValueError(f"output_column may not be one of {sorted(reserved)}")


def finalize_row(
    row: dict,
    new_caption: str,
    source: str,
    cfg: RecaptionConfig,
    scores: Any | None = None,
    error: str | None = None,
) -> dict:
    """The output row for one input ``row`` given the model's caption and the gate's scores
    (or the error that stopped either)."""
    original = row.get("caption") or ""
    out = dict(row)
    out[ORIGINAL_COLUMN] = original
    new_caption = (new_caption or "").strip()
    if error is not None:
        status = "kept_original_error"
    elif not new_caption:
        status = "kept_original_empty"
    elif scores is not None and scores.new < scores.original - cfg.gate.margin:
        status = "kept_original_gate"
    else:
        status = "recaptioned"
    out[cfg.output_column] = new_caption if status == "recaptioned" else original
    out[SOURCE_COLUMN] = source if status == "recaptioned" else ORIGINAL_SOURCE
    out[STATUS_COLUMN] = status
    out[GATE_NEW_COLUMN] = None if scores is None else float(scores.new)
    out[GATE_ORIGINAL_COLUMN] = None if scores is None else float(scores.original)
    out[ERROR_COLUMN] = error
    return out


class _Finalize(beam.DoFn):
    def __init__(self, cfg: RecaptionConfig) -> None:
        self.cfg = cfg
        self._counters: dict[str, Any] = {}

    def setup(self) -> None:
        self._counters = {s: beam.metrics.Metrics.counter(METRICS_NAMESPACE, s) for s in STATUSES}

    def process(self, element):
        _, (row, text, source, scores, error) = element
        out = finalize_row(row, text, source, self.cfg, scores, error)
        self._counters[out[STATUS_COLUMN]].inc()
        yield out


def _unpack_caption(element: tuple[str, PredictionResult]):
    uid, result = element
    return uid, (result.example, result.inference, result.model_id)


def _unpack_gate(element: tuple[str, PredictionResult]):
    uid, result = element
    row, text, source = result.example
    return uid, (row, text, source, result.inference, None)


def _describe(exception: Any) -> str:
    """``"Type: message"`` from an exception or Beam's (type, repr, traceback) triple."""
    if isinstance(exception, tuple) and exception and isinstance(exception[0], type):
        name, text = exception[0].__name__, str(exception[1]) if len(exception) > 1 else ""
    else:
        name, text = type(exception).__name__, repr(exception)
    return f"{name}: {text}"[:500]


def _failed_batch(failed: tuple[list, Any]):
    """Rows of a batch the captioner or gate raised on: keep their captions, say why."""
    batch, exception = failed
    error = _describe(exception)
    for uid, item in batch:
        row = item[0] if isinstance(item, tuple) else item
        yield uid, (row, "", ORIGINAL_SOURCE, None, error)


def _infer(pcoll, label: str, handler, on_error: str):
    """RunInference on keyed elements; with keep_original, failed batches come back as rows."""
    inference = RunInference(KeyedModelHandler(handler))
    if on_error == "fail":
        return pcoll | label >> inference, None
    main, dlq = pcoll | label >> inference.with_exception_handling()
    return main, dlq.failed_inferences | f"{label}Failed" >> beam.FlatMap(_failed_batch)


@dataclass
class RecaptionCache:
    """Where ``capgap curate --cache`` keeps captions and gate scores (transforms/cache.py):
    the spaces and their committed part files."""

    captions: Space
    caption_files: list[str]
    gate: Space | None = None
    gate_files: list[str] = field(default_factory=list)


def _caption_hit(element):
    _, (uid, row), (text, source) = element
    return uid, (row, text, source)


def _gate_hit(element):
    _, (uid, (row, text, source)), (new, original) = element
    return uid, (row, text, source, GateScores(new, original), None)


def _caption_entry(element, space: str, uses_caption: bool) -> dict:
    _, (row, text, source) = element
    return {"key": caption_key(row, space, uses_caption), "text": text or "", "source": source}


def _gate_entry(element, space: str) -> dict:
    _, (row, text, _source, scores, _error) = element
    return {
        "key": gate_key(row, text, space),
        "new": float(scores.new),
        "original": float(scores.original),
    }


class Recaption(beam.PTransform):
    """Row dicts in, recaptioned row dicts out (see the module docstring for the columns).

    With ``cache`` (a :class:`RecaptionCache`), captions and gate scores come from the cache
    where it has them; after expansion ``cache_outputs`` holds the new entries and the hit /
    miss PCollections (``caption.hit``, ``gate.miss``, ...). ``gate_precision``: the scoring
    model's config, whose autocast / ``cpu_bf16`` / thread settings the gate's CLIP takes
    (:func:`~capgap.models.recaption_handler.gate_clip`; default: float32 on the CPU)."""

    def __init__(
        self,
        config: RecaptionConfig,
        label: str | None = None,
        cache: RecaptionCache | None = None,
        gate_precision: ClipModelConfig | None = None,
    ) -> None:
        super().__init__(label)
        self.config = config
        self.cache = cache
        self.gate_precision = gate_precision  # the scoring CLIP's, which the gate's follows
        self.cache_outputs: dict = {"entries": {}, "stages": {}}

    def _look_up(self, keyed, name: str, kind: str, space: Space, files: list[str], key_fn):
        split = (
            keyed
            | f"{name}Key" >> beam.Map(lambda kv: (key_fn(kv), kv))
            | f"{name}LookUp" >> LookUp(files, kind, name.lower())
        )
        stage = name.lower()
        self.cache_outputs["stages"].update(
            {f"{stage}.{HIT}": split[HIT], f"{stage}.{MISS}": split[MISS]}
        )
        return split[HIT], split[MISS] | f"{name}Misses" >> beam.Map(lambda e: e[1])

    def expand(self, rows):
        cfg = self.config
        handler = RecaptionModelHandler(
            cfg.captioner,
            min_batch_size=cfg.min_batch_size,
            max_batch_size=cfg.max_batch_size,
            max_batch_duration_secs=cfg.max_batch_duration_secs,
            share_model_across_processes=cfg.share_model_across_processes,
        )
        cache = self.cache
        keyed = rows | "KeyByUid" >> beam.Map(lambda row: (row["uid"], row))
        if cache is not None:
            space, quoted = cache.captions.fingerprint, "{caption}" in cfg.captioner.prompt
            hits, keyed = self._look_up(
                keyed,
                "Caption",
                CAPTIONS,
                cache.captions,
                cache.caption_files,
                lambda kv: caption_key(kv[1], space, quoted),
            )
        results, failed = _infer(keyed, "Caption", handler, cfg.on_error)
        captioned = results | "UnpackCaption" >> beam.Map(_unpack_caption)
        if cache is not None:
            self.cache_outputs["entries"]["caption"] = captioned | "CaptionEntries" >> beam.Map(
                _caption_entry, space, quoted
            )
            cached = hits | "CaptionFromCache" >> beam.Map(_caption_hit)
            captioned = (captioned, cached) | "Captioned" >> beam.Flatten()
        failures = [] if failed is None else [failed]
        if cfg.gate.enabled and cache is not None and cache.gate is not None:
            gate_fp = cache.gate.fingerprint
            gate_hits, captioned = self._look_up(
                captioned,
                "Gate",
                GATE,
                cache.gate,
                cache.gate_files,
                lambda kv: gate_key(kv[1][0], kv[1][1], gate_fp),
            )
        if cfg.gate.enabled:
            gate = CaptionGateModelHandler(
                gate_clip(cfg.gate.clip_run, cfg.gate.device, self.gate_precision),
                max_batch_size=cfg.gate.batch_size,
                max_batch_duration_secs=cfg.max_batch_duration_secs,
            )
            gated, gate_failed = _infer(captioned, "Gate", gate, cfg.on_error)
            scored = gated | "UnpackGate" >> beam.Map(_unpack_gate)
            failures += [] if gate_failed is None else [gate_failed]
            if cache is not None and cache.gate is not None:
                self.cache_outputs["entries"]["gate"] = scored | "GateEntries" >> beam.Map(
                    _gate_entry, gate_fp
                )
                cached = gate_hits | "GateFromCache" >> beam.Map(_gate_hit)
                scored = (scored, cached) | "Gated" >> beam.Flatten()
        else:
            scored = captioned | "NoGate" >> beam.Map(lambda kv: (kv[0], (*kv[1], None, None)))
        if failures:
            scored = (scored, *failures) | "WithFailures" >> beam.Flatten()
        return scored | "Finalize" >> beam.ParDo(_Finalize(cfg))
