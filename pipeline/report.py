"""``capgap report``: compare evaluated runs side by side in Markdown with PNG plots.

Each RUN is a run folder holding ``eval.json`` (written by ``capgap eval``) or
the path of an eval JSON itself. The report reads what eval saved -- the flat
metrics, ``embeddings.npz`` next to the JSON, and the run's ``metrics.jsonl``
training log -- and recomputes nothing expensive. It writes ``report.md`` and:

- ``pca.png``: both modalities of each run in the 2-D PCA of their union (the gap
  shows as two clouds), class means marked;
- ``flip_vs_sigma.png``: flip rate vs noise sigma, before (solid) and after
  (dashed) the post-hoc mean shift, for zero-shot (mean over tasks) and retrieval;
- ``gap_dims.png``: per-dimension |mean_img - mean_txt| sorted, and the cumulative
  share of the squared gap ||Delta||^2 they carry;
- ``training_curves.png``: the numeric series of ``metrics.jsonl`` (per-step rows) against step.

    capgap report runs/web runs/curated --out reports/web-vs-curated
    capgap report runs/a/eval.json runs/b/eval.json --set names=[original,curated]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capgap.core.config import (
    parse_command,
    save_resolved,
)

# Metric keys of the side-by-side table (rows); a key a run lacks shows as "-".
DEFAULT_KEYS = [
    "l2m",
    "l2i",
    "rmg",
    "linear_separability",
    "cone_img",
    "cone_txt",
    "uniformity_img",
    "uniformity_txt",
    "alignment",
    "gap_top4_share",
    "ablate4_l2m",
    "i2t_r@1",
    "t2i_r@1",
    "i2t_r@5",
    "t2i_r@5",
    "terse_l2m",
    "terse_i2t_r@1",
    "terse_t2i_r@1",
    "zs_acc_object",
    "zs_acc_attr_mean",
    "moad_img",
    "moad_txt",
    "shift_l2m",
    "heldout_shift_l2m",
    "zs_mean_clean_acc",
    "shift_zs_mean_clean_acc",
    "zs_mean_flip_int4",
    "shift_zs_mean_flip_int4",
]


@dataclass
class ReportConfig:
    out: str = field(default="report", metadata={"help": "output folder"})
    title: str = field(default="capgap report", metadata={"help": "report heading"})
    names: list[str] | None = None  # one display name per run (default: folder names)
    keys: list[str] = field(default_factory=lambda: list(DEFAULT_KEYS))
    pca_points: int = field(default=1000, metadata={"help": "max points per modality in PCA"})
    seed: int = 0


@dataclass
class Run:
    name: str
    eval_path: Path
    metrics: dict[str, Any]
    embeddings: dict[str, np.ndarray] | None
    curves: list[dict[str, Any]]


# --- loading ----------------------------------------------------------------------------------


def _eval_path(arg: str | Path) -> Path:
    path = Path(arg)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: no eval.json (run `capgap eval` on it first)")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line raises naming the line number."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from err
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_run(arg: str | Path, name: str) -> Run:
    """The eval JSON, saved embeddings and training log of one run."""
    eval_path = _eval_path(arg)
    metrics = json.loads(eval_path.read_text(encoding="utf-8"))
    embeddings = None
    npz = eval_path.parent / str(metrics.get("embeddings", "embeddings.npz"))
    if npz.is_file():
        with np.load(npz) as data:
            embeddings = {k: data[k] for k in data.files}
    curves: list[dict[str, Any]] = []
    for folder in (Path(str(metrics.get("run_dir", eval_path.parent))), eval_path.parent):
        log = folder / "metrics.jsonl"
        if log.is_file():
            curves = read_jsonl(log)
            break
    return Run(
        name=name, eval_path=eval_path, metrics=metrics, embeddings=embeddings, curves=curves
    )


def default_names(args: Sequence[str | Path]) -> list[str]:
    """Folder names of the runs, made unique by prefixing parents where they clash."""
    dirs = [_eval_path(a).parent.resolve() for a in args]
    depth = 1
    while True:
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names) or depth > max(len(d.parts) for d in dirs):
            return names
        depth += 1


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pca(runs: Sequence[Run], path: Path, max_points: int, seed: int) -> Path | None:
    """2-D PCA of both modalities per run (fitted on the union of the two)."""
    with_emb = [r for r in runs if r.embeddings is not None]
    if not with_emb:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(with_emb), figsize=(4.2 * len(with_emb), 4), squeeze=False)
    rng = np.random.default_rng(seed)
    for ax, run in zip(axes[0], with_emb, strict=True):
        img, txt = run.embeddings["img"], run.embeddings["txt"]
        keep = np.sort(rng.permutation(len(img))[:max_points])
        both = np.concatenate([img[keep], txt[keep]]).astype(np.float64)
        centre = both.mean(axis=0)
        _, _, vt = np.linalg.svd(both - centre, full_matrices=False)
        proj = (both - centre) @ vt[:2].T
        n = len(keep)
        ax.scatter(proj[:n, 0], proj[:n, 1], s=5, alpha=0.5, label="image", color="tab:blue")
        ax.scatter(proj[n:, 0], proj[n:, 1], s=5, alpha=0.5, label="caption", color="tab:orange")
        for part, colour in ((proj[:n], "navy"), (proj[n:], "darkred")):
            ax.scatter(*part.mean(axis=0), marker="X", s=90, color=colour, edgecolor="white")
        l2m = run.metrics.get("l2m")
        ax.set_title(f"{run.name}" + (f"\nL2M {l2m:.3f}" if isinstance(l2m, float) else ""))
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def flip_series(metrics: dict[str, Any], task: str, shifted: bool) -> tuple[list, list]:
    """(sigmas, flip rates) of one task from an eval JSON; empty when absent."""
    prefix = "shift_" if shifted else ""
    xs, ys = [], []
    for sigma in metrics.get("robustness_sigmas", []):
        value = metrics.get(f"{prefix}{task}_flip_noise{sigma:g}")
        if isinstance(value, int | float):
            xs.append(sigma)
            ys.append(value)
    return xs, ys


def plot_flip_vs_sigma(runs: Sequence[Run], path: Path) -> Path | None:
    tasks = [
        t
        for t in ("zs_mean", "i2t", "t2i")
        if any(flip_series(r.metrics, t, False)[0] for r in runs)
    ]
    if not tasks:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    titles = {
        "zs_mean": "zero-shot (mean over tasks)",
        "i2t": "image->text R@1",
        "t2i": "text->image R@1",
    }
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, run in enumerate(runs):
            colour = colours[i % len(colours)]
            for shifted, style in ((False, "-"), (True, "--")):
                xs, ys = flip_series(run.metrics, task, shifted)
                if xs:
                    label = f"{run.name}" + (" + mean shift" if shifted else "")
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colour, label=label)
        ax.set_title(titles[task])
        ax.set_xlabel("noise sigma (expected norm)")
        ax.set_ylabel("flip rate")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gap_dims(runs: Sequence[Run], path: Path) -> Path | None:
    with_emb = [r for r in runs if r.embeddings is not None]
    if not with_emb:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for run in with_emb:
        diff = np.abs(run.embeddings["img"].mean(axis=0) - run.embeddings["txt"].mean(axis=0))
        ranked = np.sort(diff)[::-1]
        share = np.cumsum(ranked**2) / max(float((ranked**2).sum()), 1e-30)
        ranks = np.arange(1, len(ranked) + 1)
        ax1.plot(ranks, ranked, marker=".", label=run.name)
        ax2.plot(ranks, share, marker=".", label=run.name)
    ax1.set_xlabel("dimension rank")
    ax1.set_ylabel("|mean img - mean txt|")
    ax1.set_title("per-dimension mean difference")
    ax2.set_xlabel("top-k dimensions")
    ax2.set_ylabel("share of ||Delta||^2")
    ax2.set_title("how few dimensions carry the gap")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_X_KEYS = ("step", "samples", "epoch")
_SKIP_KEYS = {"step", "samples", "epoch", "time", "elapsed", "wall_time", "timestamp"}
_SKIP_KEYS |= {"seconds", "samples_per_s"}  # throughput, not training progress


def step_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step log rows (``kind == "step"``) when the log tags rows, else every row.

    `capgap train` interleaves per-epoch summaries (``kind: epoch``) with step rows;
    plotting both on one line would zigzag.
    """
    steps = [r for r in rows if r.get("kind") == "step"]
    return steps or rows


def curve_keys(runs: Sequence[Run]) -> list[str]:
    """Numeric series present in the training logs, in first-seen order."""
    keys: list[str] = []
    for run in runs:
        for row in step_rows(run.curves):
            for k, v in row.items():
                numeric = isinstance(v, int | float) and not isinstance(v, bool)
                if numeric and k not in _SKIP_KEYS and k not in keys:
                    keys.append(k)
    return keys


def plot_training_curves(runs: Sequence[Run], path: Path, max_panels: int = 6) -> Path | None:
    keys = curve_keys(runs)[:max_panels]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for run in runs:
            rows = step_rows(run.curves)
            pts = [(r, r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if not pts:
                continue
            x_key = next((k for k in _X_KEYS if all(k in r for r, _ in pts)), None)
            xs = [r[x_key] for r, _ in pts] if x_key else list(range(len(pts)))
            ax.plot(xs, [float(v) for _, v in pts], label=run.name)
            ax.set_xlabel(x_key or "log row")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- markdown ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def robustness_rows(runs: Sequence[Run], task: str = "zs_mean") -> list[list[str]]:
    """Rows sigma | per run: flip before -> after the mean shift."""
    sigmas = sorted({s for r in runs for s in r.metrics.get("robustness_sigmas", [])})
    rows = []
    for sigma in sigmas:
        row = [f"{sigma:g}"]
        for run in runs:
            before = run.metrics.get(f"{task}_flip_noise{sigma:g}")
            after = run.metrics.get(f"shift_{task}_flip_noise{sigma:g}")
            row.append(f"{_fmt(before)} -> {_fmt(after)}")
        rows.append(row)
    return rows


def write_markdown(runs: Sequence[Run], plots: dict[str, Path | None], cfg: ReportConfig) -> str:
    names = [r.name for r in runs]
    lines = [f"# {cfg.title}", ""]
    lines += _table(
        ["run", "eval", "model", "pairs", "data"],
        [
            [
                r.name,
                str(r.eval_path),
                _fmt(r.metrics.get("model")),
                _fmt(r.metrics.get("n_pairs")),
                f"`{r.metrics.get('data', '-')}`",
            ]
            for r in runs
        ],
    )
    lines += ["", "## Key metrics", ""]
    lines += _table(
        ["metric", *names], [[k, *(_fmt(r.metrics.get(k)) for r in runs)] for k in cfg.keys]
    )
    lines += [
        "",
        "L2M, L2I, RMG (Schrodi et al. 2025), linear separability (Fahim et al.), cone "
        "(Liang et al. 2022), uniformity / alignment (Wang & Isola 2020), MOAD (object bias, "
        "Schrodi et al.); definitions in SCIENCE.md. `shift_*`: after the post-hoc mean shift "
        "(Chowers et al. 2026).",
    ]
    for task, title in (("zs_mean", "zero-shot"), ("i2t", "image->text retrieval")):
        rows = robustness_rows(runs, task)
        if rows and any("-> -" not in cell for row in rows for cell in row[1:]):
            lines += [
                "",
                f"## Flip rate under Gaussian noise, {title}: before -> after mean shift",
                "",
            ]
            lines += _table(["sigma", *names], rows)
    skipped = [(r.name, note) for r in runs for note in r.metrics.get("skipped", [])]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {name}: {note}" for name, note in skipped]
    captions = {
        "pca": "2-D PCA of image and caption embeddings (X: modality means)",
        "flip": "Flip rate vs noise sigma; dashed: after the post-hoc mean shift",
        "gap_dims": "Per-dimension mean differences between the modalities",
        "curves": "Training curves (metrics.jsonl)",
    }
    lines += ["", "## Plots", ""]
    for key, plot in plots.items():
        if plot is not None:
            lines += [f"### {captions[key]}", "", f"![{key}]({plot.name})", ""]
        else:
            lines += [f"- {captions[key]}: no data", ""]
    return "\n".join(lines).rstrip() + "\n"


def make_report(run_args: Sequence[str | Path], cfg: ReportConfig | None = None) -> Path:
    """Write report.md and its PNGs under ``cfg.out``; returns the Markdown path."""
    cfg = cfg or ReportConfig()
    if not run_args:
        raise ValueError("name at least one run")
    names = cfg.names or default_names(run_args)
    if len(names) != len(run_args):
        raise ValueError(f"{len(names)} names for {len(run_args)} runs")
    runs = [load_run(arg, name) for arg, name in zip(run_args, names, strict=True)]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "pca": plot_pca(runs, out / "pca.png", cfg.pca_points, cfg.seed),
        "flip": plot_flip_vs_sigma(runs, out / "flip_vs_sigma.png"),
        "gap_dims": plot_gap_dims(runs, out / "gap_dims.png"),
        "curves": plot_training_curves(runs, out / "training_curves.png"),
    }
    md = out / "report.md"
    md.write_text(write_markdown(runs, plots, cfg), encoding="utf-8")
    save_resolved(cfg, out, "report_config.yaml")
    return md


def _runs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders with eval.json, or eval JSON paths")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_command(
        argv, "capgap report", __doc__, ReportConfig, arguments=_runs_argument
    )
    md = make_report(args.runs, cfg)
    print(f"wrote {md}")
    return 0
