"""``capgap curate``: the Beam pipeline that scores, drops, recaptions and writes image-text pairs.

Data flow (see docs in README / DESIGN.md)::

    index pass: read uids + refs (Parquet: the uid column)     -> duplicates, bank candidates
    bank pass: read the candidates' rows, decode, embed        -> reference bank (side input)
    main pass: read (Parquet | WebDataset tar | HF datasets dir | CSV) -> (uid, record)
    drop duplicate uids, decode + validate one at a time (one step) -> (uid, pair) | errors
    CLIP embed: RunInference(KeyedModelHandler(ClipModelHandler))  | errors
      (the bank's own rows take the bank pass's embeddings)
    scores against the bank                                    -> clip_score, certainty, imbalance
    decide: keep | drop (rejected/) | recaption
    recaption (transforms/recaption.py, if recaption.enabled)  -> dense caption
    write curated/ rejected/ errors/ Parquet (+ curated-wds/ tars), README.md card, manifest.json

Scheduled builds: ``--cache PREFIX`` reuses embeddings, dense captions and gate scores of
earlier builds by content; ``--previous OUT`` names the build to compare the input with
(pipeline/incremental.py, ``capgap cache stats|prune``).

Settings: a ``CurateConfig`` (defaults <- ``--config`` YAML, default the packaged
``curate`` preset <- ``--set key=value`` and the top-level flags below). Beam
options (``--runner``, ``--direct_num_workers``, ...) pass through; a runner preset
(``--runner_preset direct|dataflow|spark|flink`` or a YAML path) supplies them from
``configs/runners/``. Flags given on the command line win over the preset.

    capgap curate --input 'data/synth/web/*.parquet' --output out/web --reference runs/seed
    capgap curate --input shards/ --set read.format=hf --set decide.drop.mode=top_fraction \\
        --set decide.drop.value=0.3 --output out/hf
    capgap curate --runner_preset dataflow --input 'gs://b/shards/*.tar' --output gs://b/out \\
        --project my-project --temp_location gs://b/tmp

In Python: ``run_config(CurateConfig(...), beam_options=None) -> Manifest``, the typed entry
the CLI, the demo, check-scores and the experiments call; ``run(argv=None,
test_pipeline=None) -> dict`` (the manifest) is Beam's argv convention on top of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import posixpath
import re
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from capgap.core.collector import fewer_collections
from capgap.core.config import (
    ConfigError,
    add_config_args,
    command_parser,
    config_from_args,
    from_dict,
    to_dict,
)
from capgap.models.clip_handler import ClipModelConfig, model_fingerprint, model_input_side
from capgap.pipeline.incremental import commit_cache, input_shards, lineage, plan_cache
from capgap.pipeline.runner_presets import preset_flags
from capgap.transforms.accounting import CountOutcomes, counter_values, format_counters
from capgap.transforms.bank import INDEX_NAMESPACE, EmbedBank, EmbedOutsideBank, bank_summary
from capgap.transforms.cache import new_build_id
from capgap.transforms.captions import CaptionConfig
from capgap.transforms.decide import RECAPTION, Decide, DecideConfig
from capgap.transforms.decode import DecodeConfig
from capgap.transforms.dedup import DedupDecode, FirstRefs, index_buckets
from capgap.transforms.embed import EmbedPairs
from capgap.transforms.readers import ReadConfig, ReadRecords, discover
from capgap.transforms.readers.discover import input_layout
from capgap.transforms.recaption import Recaption, RecaptionConfig
from capgap.transforms.schema import (
    CURATED,
    ERRORS,
    ERRORS_SCHEMA,
    MANIFEST,
    REJECTED,
    recaption_fields,
    row_schema,
)
from capgap.transforms.score import ScoreConfig, ScorePairs
from capgap.transforms.wds_write import WriteWebDataset
from capgap.transforms.write import WriteConfig, WriteManifestFn, WriteParquet, clear_outputs

LOG = logging.getLogger("capgap.curate")


@dataclass
class RecaptionSwitch:
    """``enabled`` turns the recaption stage on; ``stage`` holds its RecaptionConfig fields."""

    enabled: bool = False
    stage: dict[str, Any] = field(default_factory=dict)


@dataclass
class CurateConfig:
    input: str = field(default="", metadata={"help": "input glob / folder (any Beam filesystem)"})
    output: str = field(default="out/curate", metadata={"help": "output prefix"})
    reference: str | None = field(
        default=None, metadata={"help": "a `capgap train` run dir to score with (model.run_dir)"}
    )
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (model.device)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a previous build"})
    cache: str | None = field(default=None, metadata={"help": "model-work cache prefix | auto"})
    previous: str | None = field(default=None, metadata={"help": "previous build's output"})
    num_shards: int = field(default=0, metadata={"help": "shards per output (0: runner decides)"})
    max_error_fraction: float = field(
        default=0.9,
        metadata={
            "help": "exit non-zero (3) when errors/ holds more than this share of the input "
            "rows: a wrong column or an unreachable image root fails every row (1: never)"
        },
    )
    read: ReadConfig = field(default_factory=ReadConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    decide: DecideConfig = field(default_factory=DecideConfig)
    recaption: RecaptionSwitch = field(default_factory=RecaptionSwitch)
    write: WriteConfig = field(default_factory=WriteConfig)

    def __post_init__(self) -> None:
        if self.num_shards < 0:
            raise ValueError("num_shards must be >= 0")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError("max_error_fraction must be in [0, 1]")

    def model_config(self) -> ClipModelConfig:
        """``model`` with the top-level ``reference`` / ``device`` shortcuts applied."""
        changes: dict[str, Any] = {}
        if self.reference:
            changes["run_dir"] = self.reference
        if self.device:
            changes["device"] = self.device
        return dataclasses.replace(self.model, **changes)


class PipelineFailed(RuntimeError):
    """The pipeline ran and a step raised: a bug or an infrastructure failure, never bad
    input (a bad record becomes an ``errors/`` row, a bad config a :class:`ConfigError`)."""


class CurateOptions(PipelineOptions):
    """``capgap curate`` flags, as a Beam PipelineOptions view."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        add_config_args(parser, CurateConfig, default_config="curate")
        parser.add_argument(
            "--runner_preset",
            default=None,
            help="Beam options from configs/runners/<name>.yaml "
            "(direct, portable, dataflow, spark, flink)",
        )
        parser.add_argument(
            "--verbose",
            action="store_true",
            default=False,
            help="print the traceback of every error (a failed pipeline always prints it)",
        )


# --- recaption wiring ------------------------------------------------------------------------


def recaption_stage_config(switch: RecaptionSwitch) -> RecaptionConfig:
    """The RecaptionConfig for ``recaption.stage``; unknown or ill-typed keys raise."""
    return from_dict(RecaptionConfig, switch.stage, prefix="recaption.stage.")


# --- the graph -------------------------------------------------------------------------------


def _package_versions() -> dict[str, str]:
    out = {}
    for name in ("capgap", "apache-beam", "torch", "open_clip_torch", "pillow", "pyarrow", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    out["python"] = sys.version.split()[0]
    return out


def _fingerprint_models(cfg: ClipModelConfig, captioner: dict[str, Any] | None):
    def fingerprint(models: dict[str, Any]) -> dict[str, Any]:
        out = dict(models)
        out["clip"] = model_fingerprint(cfg)
        if captioner is not None:
            out["captioner"] = captioner
        return out

    return fingerprint


def with_model_side(cfg: CurateConfig) -> CurateConfig:
    """``cfg`` with ``decode.model_max_side`` filled in when unset: the scoring model's own
    input side (224 for ViT-B/32), so that decoding (a large JPEG at reduced scale included)
    makes no pixels the model's resize would throw away."""
    if cfg.decode.model_max_side is not None:
        return cfg
    try:
        side = model_input_side(cfg.model_config())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"decode.model_max_side: the scoring model's input side could not be read ({err}); "
            "set it (e.g. --set decode.model_max_side=224)"
        ) from err
    return dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, model_max_side=side))


def build(p: beam.Pipeline, cfg: CurateConfig, started: float | None = None) -> dict[str, Any]:
    """Add the curate graph to ``p``; returns its main PCollections (for tests)."""
    started = time.time() if started is None else started
    cfg = with_model_side(cfg)  # a no-op after planned_pipeline; build is also called alone
    plan = discover(cfg.read, cfg.input)
    model_cfg = cfg.model_config()
    stage_cfg = recaption_stage_config(cfg.recaption) if cfg.recaption.enabled else None
    recaption_on = stage_cfg is not None
    build_id = new_build_id()
    # --cache: model work looked up by content, a keyed join (pipeline/incremental.py); without
    # it the graph has no join. The bank pass writes no entries (its rows are main-pass rows).
    cache = plan_cache(cfg, build_id, model_cfg, stage_cfg) if cfg.cache else None
    bank_embed = cache.embed(cache.bank_model(model_cfg), "bank_embed", False) if cache else None

    # Index and bank come from reads of their own (transforms/bank.py), so the main pass
    # below runs from read to write without holding rows at a barrier.
    refs = p | "ReadIndex" >> ReadRecords(plan, INDEX_NAMESPACE, index_only=True)
    buckets = index_buckets(len(plan.files), plan.total_bytes())
    first_refs = refs | "FirstRefs" >> FirstRefs(buckets)
    bank = first_refs | "Bank" >> EmbedBank(
        plan, cfg.decode, cfg.caption, model_cfg, cfg.score, bank_embed
    )
    # The bank's rows were embedded by the bank pass: the main pass embeds the others. With
    # --cache every row goes through the cache stage, which writes the entries of the build
    # (a bank row the cache misses takes its embeddings from the bank).
    if cache:
        main_embed = cache.embed(model_cfg, "embed", bank=bank)
    else:
        main_embed = EmbedOutsideBank(EmbedPairs(model_cfg), bank)
    records = p | "Read" >> ReadRecords(plan)
    # Duplicate uids out, then decode + validate, in one step (one element boundary a row).
    decoded = records | "DedupDecode" >> DedupDecode(first_refs, cfg.decode, cfg.caption)
    embedded = decoded.ok | "Embed" >> main_embed
    scored = embedded["ok"] | "Score" >> ScorePairs(cfg.score, bank)
    decided = scored | "Decide" >> Decide(cfg.decide, recaption_stage=recaption_on)

    recaption = None
    if recaption_on:
        recaption = Recaption(
            stage_cfg, cache=cache.recaption() if cache else None, gate_precision=model_cfg
        )
        recaptioned = decided[RECAPTION] | "Recaption" >> recaption
        curated = (decided["keep"], recaptioned) | "Curated" >> beam.Flatten()
    else:
        curated = decided["keep"]  # rows marked recaption included, status "disabled"
    rejected = decided["drop"]
    errors = (decoded[ERRORS], embedded[ERRORS]) | "Errors" >> beam.Flatten()

    # One schema for curated/ and rejected/ (the recaption columns null on rejected rows).
    schema = row_schema(
        plan.passthrough, recaption_fields(stage_cfg.output_column if stage_cfg else "caption")
    )
    files = {
        CURATED: curated
        | "WriteCurated" >> WriteParquet(cfg.output, CURATED, schema, cfg.num_shards),
        REJECTED: rejected
        | "WriteRejected" >> WriteParquet(cfg.output, REJECTED, schema, cfg.num_shards),
        ERRORS: errors
        | "WriteErrors" >> WriteParquet(cfg.output, ERRORS, ERRORS_SCHEMA, cfg.num_shards),
    }
    if "webdataset" in cfg.write.formats:
        shards = curated | "WriteCuratedWds" >> WriteWebDataset(
            cfg.output, cfg.num_shards, cfg.write.webdataset_samples_per_shard
        )
    else:
        shards = p | "NoWebDataset" >> beam.Create([])
    counts = {CURATED: curated, REJECTED: rejected, ERRORS: errors} | "Count" >> CountOutcomes()
    runtime = decided["thresholds"] | "Runtime" >> beam.Map(
        lambda thresholds, bank: {"thresholds": thresholds, "bank": bank_summary(bank)},
        bank=beam.pvalue.AsSingleton(bank),
    )
    if cache is not None:  # new entries, then the commit record, then the manifest
        summary = commit_cache(p, cache, [main_embed, bank_embed, recaption], cfg.output, plan)
        runtime = runtime | "WithCache" >> beam.Map(
            lambda r, cache: {**r, "cache": cache}, cache=beam.pvalue.AsSingleton(summary)
        )
    captioner = None
    if recaption_on:
        captioner = {"config": to_dict(stage_cfg.captioner), "gate": to_dict(stage_cfg.gate)}
    static = {
        "command": "capgap curate",
        "build_id": build_id,
        "lineage": lineage(build_id, plan, cfg.previous, cache, cfg.output),
        "input": {
            "pattern": plan.pattern,
            "format": plan.format,
            "files": len(plan.files),
            "bytes": plan.total_bytes(),
            "fingerprint": plan.fingerprint(),
            "fingerprint_method": "sha256 over (relative path, size, mtime) of each input file "
            "(HF: every file of the folder; webdataset: the img2dataset metadata Parquets too)",
            **input_layout(plan),
            "shards": input_shards(plan),
            "columns": {
                "image": plan.image_column,
                "caption": plan.caption_column,
                "uid": plan.uid_column,
                "passthrough": plan.passthrough.names,
            },
        },
        "config": to_dict(cfg),
        "recaption": {
            "enabled": cfg.recaption.enabled,
            "ran": recaption_on,
        },
        "packages": _package_versions(),
        "runner": str(p.options.view_as(StandardOptions).runner or "DirectRunner"),
        "models": {"clip": {"id": model_cfg.model_id()}},
    }
    manifest = (
        p
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest"
        >> beam.ParDo(
            WriteManifestFn(cfg.output, static, started, _fingerprint_models(model_cfg, captioner)),
            counts=beam.pvalue.AsSingleton(counts),
            curated_files=beam.pvalue.AsList(files[CURATED]),
            rejected_files=beam.pvalue.AsList(files[REJECTED]),
            error_files=beam.pvalue.AsList(files[ERRORS]),
            runtime=beam.pvalue.AsSingleton(runtime),
            webdataset=beam.pvalue.AsList(shards),
        )
    )
    return {
        "records": records,
        CURATED: curated,
        REJECTED: rejected,
        ERRORS: errors,
        "embedded": embedded["ok"],  # with embeddings (benchmarks/certainty_candidates.py)
        "scored": scored,
        "bank": bank,
        "counts": counts,
        "manifest": manifest,
        "plan": plan,
    }


# --- entry points ----------------------------------------------------------------------------


def validate(cfg: CurateConfig) -> None:
    """Checks that need the whole config, done before any worker starts."""
    if not cfg.input:
        raise ConfigError("no input: pass --input PATTERN (or set input in the config)")
    if cfg.recaption.enabled:
        recaption_stage_config(cfg.recaption)  # unknown or ill-typed stage keys raise here


def parse(argv: Sequence[str]) -> tuple[CurateConfig, PipelineOptions]:
    """Resolve argv (with an optional --runner_preset) into (config, pipeline options)."""
    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--runner_preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.runner_preset:
        flags, overrides = preset_flags(known.runner_preset)
        argv = flags + [f"--set={o}" for o in overrides] + argv
    options = PipelineOptions(argv)
    values = options.view_as(CurateOptions).get_all_options()
    namespace = argparse.Namespace(
        **{k: v for k, v in values.items() if k.startswith("cfg__") or k in ("config", "overrides")}
    )
    cfg = config_from_args(CurateConfig, namespace)
    validate(cfg)
    return cfg, options


def prepare_output(cfg: CurateConfig) -> list[str]:
    """Refuse to replace a finished build without --overwrite; clear an unfinished one.

    A build without a manifest never finished (the manifest is written last), so what
    it left (part files, Beam's ``beam-temp-*`` folders) is removed before writing.
    """
    finished = FileSystems.exists(posixpath.join(cfg.output, MANIFEST))
    if finished and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} already holds a finished build; pass --overwrite")
    cleared = clear_outputs(cfg.output)
    if cleared and not finished:
        LOG.warning(
            "removed %d leftovers of an unfinished build under %s", len(cleared), cfg.output
        )
    return cleared


@dataclass(frozen=True)
class Manifest:
    """A finished build: ``manifest.json`` as written, and the run's Beam counters."""

    document: dict[str, Any]
    metrics: dict[str, int]

    @property
    def counts(self) -> dict[str, Any]:
        """rows_in, curated, rejected, errors, and per-reason counts of each outcome."""
        return self.document["counts"]

    @property
    def output(self) -> str:
        return self.document["config"]["output"]

    @property
    def wall_time_s(self) -> float:
        return self.document["wall_time_s"]

    def too_many_errors(self) -> str | None:
        """Why the build failed as a whole (errors above ``max_error_fraction`` of the input,
        or no input row at all), with the most common error reason; None when it did not."""
        counts, limit = self.counts, self.document["config"]["max_error_fraction"]
        rows, errors = counts["rows_in"], counts["errors"]
        if rows == 0:
            return "the input holds no rows"
        if errors / rows <= limit:
            return None
        reasons = counts["by_reason"]["errors"]
        top = max(reasons, key=reasons.get) if reasons else "?"
        return (
            f"{errors} of {rows} rows are errors ({errors / rows:.0%} > max_error_fraction "
            f"{limit:g}), most of them {top} ({reasons.get(top, 0)}): see {self.output}/errors/"
        )

    def as_dict(self) -> dict[str, Any]:
        """The manifest with the counters under ``metrics`` (what :func:`run` returns)."""
        return {**self.document, "metrics": self.metrics}


def planned_pipeline(
    cfg: CurateConfig,
    beam_options: PipelineOptions | Sequence[str] | None = None,
    test_pipeline: beam.Pipeline | None = None,
) -> beam.Pipeline:
    """Check ``cfg``, clear an unfinished build and add the curate graph to a pipeline (not
    yet run). Bad config, input or output raise here, before anything is submitted."""
    validate(cfg)
    cfg = with_model_side(cfg)  # reads the model's config: fails before the output is touched
    prepare_output(cfg)
    started = time.time()
    if test_pipeline is not None:
        p = test_pipeline
    else:
        options = beam_options
        if not isinstance(options, PipelineOptions):
            options = PipelineOptions(list(options or []))
        p = beam.Pipeline(options=options)
    build(p, cfg, started)
    return p


def run_config(
    cfg: CurateConfig,
    beam_options: PipelineOptions | Sequence[str] | None = None,
    test_pipeline: beam.Pipeline | None = None,
) -> Manifest:
    """Build and run the curate pipeline for ``cfg``: the typed entry every caller uses.

    ``beam_options``: Beam's ``PipelineOptions`` or their flags (``["--runner=..."]``);
    default the DirectRunner. ``test_pipeline`` replaces the pipeline (tests). Waits for the
    build and returns its manifest; to submit without waiting (a Flex Template launcher),
    call ``planned_pipeline(cfg, options).run()``.

        manifest = run_config(CurateConfig(input="data/web/*.parquet", output="out/web"))
        manifest.counts["curated"]
    """
    p = planned_pipeline(cfg, beam_options, test_pipeline)
    try:
        with fewer_collections():  # a DirectRunner runs the steps in this process
            result = p.run()
            state = result.wait_until_finish()
    except Exception as err:
        raise PipelineFailed(_failure_summary(err)) from err
    if state is not None and str(state).upper().rsplit(".", 1)[-1] not in ("DONE", "UNKNOWN"):
        raise PipelineFailed(f"the runner reports the pipeline {state}")
    with FileSystems.open(posixpath.join(cfg.output, MANIFEST)) as fh:
        document = json.loads(fh.read().decode("utf-8"))
    return Manifest(document, counter_values(result))


def _failure_summary(err: BaseException) -> str:
    """One line: the exception, and the step it happened in (Beam appends
    ``[while running 'Step/Name']`` to what a step raised)."""
    text = str(err)
    step = re.findall(r"\[while running '([^']+)'\]", text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    where = f" in step {step[-1]!r}" if step else ""
    return f"{type(err).__name__}{where}: {first[:300]}"


def run(argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict:
    """Beam's entry convention: argv -> :func:`run_config`; returns the manifest as a dict
    (with the Beam counters under 'metrics')."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, options = parse(argv)
    return run_config(cfg, options, test_pipeline).as_dict()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        parser = command_parser("capgap curate", __doc__)
        CurateOptions._add_argparse_args(parser)
        parser.print_help()
        print("\nAny Beam pipeline option (--runner, --direct_num_workers, ...) is passed on.")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    verbose = "--verbose" in argv
    try:
        cfg, options = parse(argv)
        manifest = run_config(cfg, options)
    except PipelineFailed as err:
        # Not the user's doing: the traceback is what a bug report needs.
        traceback.print_exception(err.__cause__ or err)
        print(f"capgap curate: the pipeline failed: {err}", file=sys.stderr)
        return 1
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        # Raised while planning the build (bad config, input that matches nothing, an
        # output in the way): one line says what to change.
        if verbose:
            traceback.print_exc()
        print(f"capgap curate: {err}", file=sys.stderr)
        return 2
    counts = manifest.counts
    print(
        f"rows_in={counts['rows_in']} curated={counts['curated']} "
        f"rejected={counts['rejected']} errors={counts['errors']} "
        f"({manifest.wall_time_s:.1f} s) -> {manifest.output}"
    )
    print("counters:\n" + format_counters(manifest.metrics))
    failed = manifest.too_many_errors()
    if failed:
        print(f"capgap curate: the build failed: {failed}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
