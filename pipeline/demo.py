"""``capgap demo``: the whole loop on the synthetic world, offline, on CPU.

1. ``synth``: write the ``seed`` (dense) and ``test`` (dense, labelled) splits the
   captioner reads;
2. train the dense captioner on ``seed`` and, side by side, write the other splits
   (``web``: terse, 10% mismatched; the reference's curriculum) and train the reference
   CLIP (on ``seed``, or through a curriculum of clean splits: see ``reference_pretrain``)
   (``parallel`` processes, one torch thread each: the independent steps fill 2 cores);
3. ``curate`` the ``web`` split through Beam (DirectRunner): score certainty and
   imbalance, drop mismatched pairs, recaption terse ones, write shards;
4. train the same student CLIP on the original ``web`` split and on the curated
   one with the same budget (pairs seen);
5. evaluate both on ``test``, write a report (Markdown + plots) and print the
   headline table.

    capgap demo                      # configs/demo.yaml (about 5 minutes on 2 cores)
    capgap demo --quick              # configs/demo_quick.yaml (the smoke test in `make test`)
    capgap demo --out_dir demo_out --set student.epochs=12

Everything lands under ``out_dir``; ``headline.json`` and ``report/report.md``
hold the results, ``config.yaml`` the resolved settings.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from capgap.core.config import (
    ConfigError,
    parse_command,
    save_resolved,
)
from capgap.core.files import expand_paths
from capgap.pipeline import curate, synth
from capgap.pipeline.evaluate import EvalConfig, evaluate
from capgap.pipeline.jobs import JobPool
from capgap.pipeline.report import ReportConfig, make_report
from capgap.pipeline.train import TrainConfig, train
from capgap.pipeline.train_captioner import TrainCaptionerConfig, train_captioner

# Headline metrics: (key in eval.json, label, better when)
HEADLINE: list[tuple[str, str, str]] = [
    ("l2m", "L2M gap, dense test captions", "lower"),
    ("rmg", "RMG", "lower"),
    ("linear_separability", "linear separability", "lower"),
    ("i2t_r@1", "image->text R@1, dense test captions", "higher"),
    ("t2i_r@1", "text->image R@1, dense test captions", "higher"),
    ("terse_l2m", "L2M gap, terse test captions", "lower"),
    ("terse_i2t_r@1", "image->text R@1, terse test captions", "higher"),
    ("terse_t2i_r@1", "text->image R@1, terse test captions", "higher"),
    ("zs_acc_object", "zero-shot object acc", "higher"),
    ("zs_acc_attr_mean", "zero-shot attribute acc (mean)", "higher"),
    ("zs_mean_flip_noise0.3", "zero-shot flip rate, sigma 0.3", "lower"),
]


@dataclass
class ReferenceStage:
    """One pretraining stage of the reference CLIP: ``train`` on the synth split ``split``."""

    split: str = "pretrain"
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DemoConfig:
    out_dir: str = field(default="demo_out", metadata={"help": "everything lands here"})
    quick: bool = field(default=False, metadata={"help": "use the small demo_quick preset"})
    parallel: int = field(
        default=2,
        metadata={
            "help": "processes for independent steps (reference + captioner, the two "
            "students, the two evals); 1 = one after another"
        },
    )
    runner_mode: str = field(default="in_memory", metadata={"help": "DirectRunner mode for curate"})
    synth: synth.SynthConfig = field(default_factory=synth.SynthConfig)
    reference: TrainConfig = field(default_factory=TrainConfig)
    # The split the reference's last stage (``reference``) trains on.
    reference_split: str = "seed"
    # Stages the reference trains through before ``reference`` fine-tunes it.
    # Dense captions alone let a contrastive model match pairs by colour, size, position,
    # background and texture and never learn the object (zero-shot object accuracy stays
    # at chance), which leaves a terse mismatched caption ("a star" on a circle) undetectable.
    reference_pretrain: list[ReferenceStage] = field(default_factory=list)
    captioner: TrainCaptionerConfig = field(default_factory=TrainCaptionerConfig)
    curate: curate.CurateConfig = field(default_factory=curate.CurateConfig)
    student: TrainConfig = field(default_factory=TrainConfig)
    # Both students start from the weights of this ``reference_pretrain`` stage (1-based; 0:
    # from scratch, or ``student.pretrained``): a base that knows the objects, fine-tuned on
    # the original and on the curated web. From scratch, web captions let a student match
    # pairs by background and texture and never learn the object (zero-shot 0.19).
    student_init_stage: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.student_init_stage <= len(self.reference_pretrain):
            raise ValueError(
                f"student_init_stage {self.student_init_stage} names no reference_pretrain "
                f"stage (there are {len(self.reference_pretrain)})"
            )
        if self.student_init_stage:
            stage = self.reference_pretrain[self.student_init_stage - 1].train
            if stage.model != self.student.model:
                raise ValueError(
                    f"student_init_stage {self.student_init_stage} trains {stage.model}; "
                    f"student.model is {self.student.model}"
                )


@dataclass
class Timer:
    """Wall time per demo step, printed as it goes."""

    steps: dict[str, float] = field(default_factory=dict)
    jobs: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter)
    _round: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        """Record the time since the previous mark under ``name``, with the side-by-side jobs
        that finished since (the longest is the step's critical path)."""
        now = time.perf_counter()
        self.steps[name] = round(now - self._start, 2)
        jobs = "".join(f"; {job} {seconds:.1f}s" for job, seconds in self._round.items())
        print(f"== {name} done in {self.steps[name]:.1f}s{jobs}", flush=True)
        self.jobs.update(self._round)
        self._round = {}
        self._start = now

    def side_by_side(self, pool: JobPool, jobs: dict[str, tuple[Callable, tuple]]) -> list[Any]:
        """``pool.run`` of the named jobs, noting when each finished since the last mark."""
        names = list(jobs)

        def done(i: int) -> None:
            self._round[names[i]] = round(time.perf_counter() - self._start, 2)

        return pool.run(list(jobs.values()), on_done=done)


# --- the steps --------------------------------------------------------------------------------


# What the captioner reads (captioner_config): written first, so it can start at once.
CAPTIONER_SPLITS = ("seed", "test")


def make_data(
    cfg: DemoConfig,
    pool: JobPool | None = None,
    only: Sequence[str] | None = None,
    processes: int | None = None,
) -> dict[str, str]:
    """Write the splits, or those in ``only`` (on ``pool``'s workers when given, else on
    ``processes`` (default ``synth.processes``); 1: in this process); returns split ->
    Parquet glob for every split."""
    synth_cfg = replace(cfg.synth, out=str(Path(cfg.out_dir) / "data"), split="all")
    if processes is not None:
        synth_cfg = replace(synth_cfg, processes=processes)
    synth.run(synth_cfg, show_progress=False, pool=pool, only=only)
    return {name: str(Path(synth_cfg.out) / name / "*.parquet") for name in synth_cfg.splits}


def make_data_and_train_reference(cfg: DemoConfig) -> Path:
    """The splits the captioner does not read, then the reference CLIP: one job, which takes
    about as long as the captioner's (the critical path) with them."""
    rest = [s for s in cfg.synth.splits if s not in CAPTIONER_SPLITS]
    data = make_data(cfg, only=rest, processes=1)  # in this worker, beside the captioner
    return train_reference(cfg, data)


def train_reference(cfg: DemoConfig, data: dict[str, str]) -> Path:
    """The scoring CLIP: each ``reference_pretrain`` stage, then ``reference``.

    Every stage starts from the previous stage's weights (a curriculum, as a real reference
    CLIP was pretrained on web alt-text long before anyone scores with it).
    """
    weights = cfg.reference.pretrained
    for i, stage in enumerate(cfg.reference_pretrain):
        if stage.split not in data:
            raise ConfigError(
                f"reference_pretrain[{i}].split {stage.split!r} not in {sorted(data)}"
            )
        if stage.train.model != cfg.reference.model:
            raise ConfigError(f"reference_pretrain[{i}].train.model must equal reference.model")
        run = replace(
            stage.train,
            data=data[stage.split],
            out_dir=str(stage_dir(cfg, i + 1)),
            pretrained=weights,
            overwrite=True,
            resume=False,
        )
        weights = str(train(run) / "model.safetensors")
    if cfg.reference_split not in data:
        raise ConfigError(f"reference_split {cfg.reference_split!r} not in {sorted(data)}")
    run = replace(
        cfg.reference,
        data=data[cfg.reference_split],
        out_dir=str(Path(cfg.out_dir) / "reference"),
        pretrained=weights,
        overwrite=True,
        resume=False,
    )
    return train(run)


def stage_dir(cfg: DemoConfig, stage: int) -> Path:
    """The run folder of ``reference_pretrain`` stage ``stage`` (1-based)."""
    split = cfg.reference_pretrain[stage - 1].split
    return Path(cfg.out_dir) / f"reference-stage{stage}-{split}"


def student_init(cfg: DemoConfig) -> str | None:
    """The weights both students start from (``student_init_stage``), else ``student.pretrained``."""
    if cfg.student_init_stage:
        return str(stage_dir(cfg, cfg.student_init_stage) / "model.safetensors")
    return cfg.student.pretrained


def captioner_config(cfg: DemoConfig, data: dict[str, str]) -> TrainCaptionerConfig:
    """The dense captioner's training run: on ``seed``, evaluated on ``test``."""
    out = Path(cfg.out_dir) / "captioner"
    seed_dir, test_dir = (str(Path(data[s]).parent) for s in ("seed", "test"))
    return replace(cfg.captioner, data=seed_dir, eval_data=test_dir, out=str(out))


def curate_split(
    cfg: DemoConfig,
    split_glob: str,
    reference: Path,
    captioner: Path | None,
    name: str = "curated",
    drop: bool = True,
) -> curate.Manifest:
    """Run ``capgap curate`` (Beam, DirectRunner) on a split; returns its manifest.

    ``captioner=None`` turns recaptioning off (rows marked recaption keep their
    caption); ``drop=False`` turns the certainty filter off.
    """
    output = Path(cfg.out_dir) / name
    curate_cfg = replace(cfg.curate, input=split_glob, output=str(output), reference=str(reference))
    curate_cfg.overwrite = True
    if not drop:
        curate_cfg.decide = replace(
            curate_cfg.decide, drop=replace(curate_cfg.decide.drop, mode="off")
        )
    stage = dict(curate_cfg.recaption.stage)
    if captioner is not None:
        captioner_section = dict(stage.get("captioner", {}))
        captioner_section["model"] = str(captioner)
        stage["captioner"] = captioner_section
        gate = dict(stage.get("gate", {}))
        if gate.get("enabled"):
            gate["clip_run"] = str(reference)
        stage["gate"] = gate
    curate_cfg.recaption = curate.RecaptionSwitch(enabled=captioner is not None, stage=stage)
    return curate.run_config(curate_cfg, ["--direct_running_mode", cfg.runner_mode])


def split_rows(split_glob: str) -> int:
    """Rows in the Parquet shards matching ``split_glob`` (from their footers)."""
    return sum(pq.read_metadata(p).num_rows for p in expand_paths(split_glob))


def pairs_budget(cfg: DemoConfig, split_glob: str) -> int:
    """Pairs a student sees: ``student.epochs`` passes over the original split."""
    return cfg.student.epochs * split_rows(split_glob)


def student_epochs(budget_pairs: int, rows: int) -> int:
    """Whole epochs over ``rows`` nearest to ``budget_pairs`` pairs seen (at least 1)."""
    return max(1, round(budget_pairs / rows))


def train_student(
    cfg: DemoConfig, data: str, name: str, budget_pairs: int, seed: int | None = None
) -> Path:
    """Train the student on ``data`` for ``budget_pairs`` pairs seen, in whole epochs.

    The epoch count is rounded to the nearest (at least 1), so a split that lost rows to the
    drop rule sees about the same number of pairs, never a full epoch more.
    """
    rows = split_rows(data)
    if rows == 0:
        raise ValueError(f"no rows to train on in {data}")
    run = replace(
        cfg.student,
        data=data,
        out_dir=str(Path(cfg.out_dir) / name),
        epochs=student_epochs(budget_pairs, rows),
        pretrained=student_init(cfg),
        seed=cfg.student.seed if seed is None else seed,
        overwrite=True,
        resume=False,
    )
    return train(run)


def evaluate_run(cfg: DemoConfig, run_dir: Path, test_glob: str) -> dict[str, Any]:
    return evaluate(run_dir, replace(cfg.eval, data=test_glob, out=str(run_dir / "eval.json")))


def train_and_evaluate_student(
    cfg: DemoConfig, data: str, name: str, budget_pairs: int, seed: int, test_glob: str
) -> dict[str, Any]:
    """``train_student`` then ``evaluate_run`` (one job of the curation experiment)."""
    return evaluate_run(cfg, train_student(cfg, data, name, budget_pairs, seed), test_glob)


def headline_table(original: dict[str, Any], curated: dict[str, Any]) -> tuple[str, dict]:
    """Markdown table original vs curated, and the checks the demo promises."""
    lines = ["| metric | original web | curated web | change |", "|---|---|---|---|"]
    for key, label, better in HEADLINE:
        a, b = original.get(key), curated.get(key)
        if not isinstance(a, float) or not isinstance(b, float):
            continue
        rel = f"{(b - a) / abs(a) * 100:+.0f}%" if a else "n/a"
        mark = "better" if (b < a if better == "lower" else b > a) else "not better"
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {rel} ({mark}) |")
    l2m_cut = 1.0 - curated["l2m"] / original["l2m"]
    checks = {
        "l2m_reduction": round(l2m_cut, 4),
        "l2m_reduced_by_40pct": l2m_cut >= 0.4,
        "rmg_reduced": curated["rmg"] < original["rmg"],
        "i2t_r1_not_lower": curated["i2t_r@1"] >= original["i2t_r@1"],
        "t2i_r1_not_lower": curated["t2i_r@1"] >= original["t2i_r@1"],
    }
    return "\n".join(lines), checks


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """The whole loop; returns the headline dict (also written to out_dir/headline.json)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    timer = Timer()
    started = time.perf_counter()

    # One pool of workers for every side-by-side step: each imports torch and Beam once.
    with JobPool(cfg.parallel) as pool:
        data = make_data(cfg, pool, only=CAPTIONER_SPLITS)
        timer.mark("synth: seed / test splits")
        reference, captioner = timer.side_by_side(
            pool,
            {
                "reference": (make_data_and_train_reference, (cfg,)),
                # train_captioner's own module, not this one: its worker imports neither Beam
                # nor open_clip on the demo's critical path
                "captioner": (train_captioner, (captioner_config(cfg, data),)),
            },
        )
        pool.warm(["capgap.pipeline.demo"])  # the students' and evals' module, while curate runs
        timer.mark("synth the other splits + train reference CLIP | train dense captioner")
        manifest = curate_split(cfg, data["web"], reference, captioner)
        timer.mark("curate web (Beam: score, drop, recaption, write)")

        curated_glob = str(out / "curated" / "curated" / "*.parquet")
        budget = pairs_budget(cfg, data["web"])
        student_original, student_curated = timer.side_by_side(
            pool,
            {
                "student-original": (train_student, (cfg, data["web"], "student-original", budget)),
                "student-curated": (train_student, (cfg, curated_glob, "student-curated", budget)),
            },
        )
        timer.mark("train students on original and curated web")

        original, curated = timer.side_by_side(
            pool,
            {
                "eval-original": (evaluate_run, (cfg, student_original, data["test"])),
                "eval-curated": (evaluate_run, (cfg, student_curated, data["test"])),
            },
        )
        timer.mark("evaluate both on test")
        pool.close(wait=False)  # the workers exit while the report is drawn
    report = make_report(
        [student_original, student_curated],
        ReportConfig(
            out=str(out / "report"),
            title="capgap demo: original vs curated web",
            names=["original", "curated"],
        ),
    )
    timer.mark("report")

    table, checks = headline_table(original, curated)
    headline = {
        "curate_counts": manifest.counts,
        "original": {key: original.get(key) for key, _, _ in HEADLINE},
        "curated": {key: curated.get(key) for key, _, _ in HEADLINE},
        "checks": checks,
        "timings_s": timer.steps,
        "job_timings_s": timer.jobs,
        "total_s": round(time.perf_counter() - started, 1),
        "report": str(report),
    }
    (out / "headline.json").write_text(json.dumps(headline, indent=1) + "\n", encoding="utf-8")
    print()
    print(f"curate: {json.dumps(manifest.counts)}")
    print(table)
    print(f"checks: {json.dumps(checks)}")
    print(f"total {headline['total_s']:.0f}s; report: {report}; headline: {out / 'headline.json'}")
    return headline


# --- CLI -----------------------------------------------------------------------------------------


def _quick_preset(args: argparse.Namespace) -> None:
    """``--quick`` reads the ``demo_quick`` preset unless another config was named."""
    if args.cfg__quick and args.config == "demo":
        args.config = "demo_quick"


def main(argv: Sequence[str] | None = None) -> int:
    cfg, _ = parse_command(argv, "capgap demo", __doc__, DemoConfig, "demo", section=_quick_preset)
    run_demo(cfg)
    return 0
