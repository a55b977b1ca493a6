"""``capgap check-scores``: validate certainty and imbalance against the synthetic ground truth.

Runs ``capgap curate`` on a labelled split (the ``web`` split: terse captions, some
mismatched) with every decision rule off, so each valid row lands in ``curated/``
with its scores, then measures

- certainty AUROC: how well ``certainty`` separates matched from ``mismatched``
  pairs (target >= 0.95; ``clip_score``'s AUROC is printed as the baseline);
- Spearman(imbalance, A - k) over matched rows, where A - k is the number of
  attributes the caption leaves out (target >= 0.6).

The reference CLIP is a ``capgap train`` run (e.g. trained on the ``seed`` split).

    capgap check-scores --reference runs/seed --data data/synth/web
    capgap check-scores --curated out/web          # check an existing curate output
    capgap check-scores --reference runs/seed --data data/synth/web --set curate_set='["score.certainty=rank"]'
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import posixpath
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from capgap.core import world
from capgap.core.config import ConfigError, add_config_args, config_from_args

N_ATTRIBUTES = len(world.ATTRIBUTE_NAMES)


@dataclass
class CheckScoresConfig:
    reference: str | None = field(default=None, metadata={"help": "`capgap train` run dir"})
    data: str = field(default="data/synth/web", metadata={"help": "labelled split: dir or glob"})
    curated: str | None = field(
        default=None, metadata={"help": "check this existing curate output instead of running"}
    )
    out: str | None = field(default=None, metadata={"help": "curate output (default: temp dir)"})
    bank_size: int = field(default=2048, metadata={"help": "reference bank size"})
    auroc_target: float = field(default=0.95, metadata={"help": "certainty AUROC target"})
    spearman_target: float = field(default=0.6, metadata={"help": "imbalance Spearman target"})
    strict: bool = field(default=False, metadata={"help": "exit 1 when a target is missed"})
    curate_set: list[str] = field(default_factory=list)  # extra curate --set overrides
    beam_args: list[str] = field(default_factory=list)  # e.g. ["--direct_num_workers=2"]


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_vals[end] != sorted_vals[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def read_scored(output: str) -> dict[str, np.ndarray]:
    """uid, scores and ground truth of every scored row under a curate output."""
    paths = sorted(glob.glob(posixpath.join(output, "curated", "*.parquet")))
    paths += sorted(glob.glob(posixpath.join(output, "rejected", "*.parquet")))
    columns = ["uid", "clip_score", "certainty", "imbalance", "mismatched", "k"]
    tables = [pq.read_table(p, columns=columns) for p in paths]
    rows: dict[str, list] = {c: [] for c in columns}
    for table in tables:
        for c in columns:
            rows[c].extend(table.column(c).to_pylist())
    return {c: np.asarray(v) for c, v in rows.items()}


def evaluate(scored: dict[str, np.ndarray]) -> dict[str, float]:
    """The two acceptance numbers plus baselines."""
    mismatched = scored["mismatched"].astype(bool)
    matched = ~mismatched
    omitted = N_ATTRIBUTES - scored["k"].astype(np.int64)
    return {
        "rows": int(len(mismatched)),
        "mismatched": int(mismatched.sum()),
        "certainty_auroc": auroc(scored["certainty"], matched),
        "clip_score_auroc": auroc(scored["clip_score"], matched),
        "imbalance_spearman": spearman(scored["imbalance"][matched], omitted[matched]),
        "clip_score_spearman": spearman(-scored["clip_score"][matched], omitted[matched]),
        "certainty_spearman": spearman(-scored["certainty"][matched], omitted[matched]),
    }


def run_curate(cfg: CheckScoresConfig, out: str) -> None:
    from capgap.pipeline import curate

    data = cfg.data
    if os.path.isdir(data) and not os.path.exists(os.path.join(data, "dataset_info.json")):
        data = os.path.join(data, "*.parquet")
    argv = [
        f"--input={data}",
        f"--output={out}",
        f"--reference={cfg.reference}",
        "--overwrite",
        "--set=decide.drop.mode=off",
        "--set=decide.drop_clip.mode=off",
        "--set=decide.recaption.mode=off",
        f"--set=score.bank_size={cfg.bank_size}",
        *[f"--set={s}" for s in cfg.curate_set],
        *cfg.beam_args,
    ]
    curate.run(argv)


def check(cfg: CheckScoresConfig) -> dict[str, float]:
    if cfg.curated:
        output = cfg.curated
    else:
        if not cfg.reference:
            raise ConfigError("pass --reference RUN_DIR (or --curated OUTPUT)")
        output = cfg.out or tempfile.mkdtemp(prefix="capgap-check-scores-")
        run_curate(cfg, output)
    results = evaluate(read_scored(output))
    manifest_path = posixpath.join(output, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        results["certainty_method"] = manifest["config"]["score"]["certainty"]
        results["bank_size"] = manifest.get("bank", {}).get("size")
        results["tau"] = manifest.get("bank", {}).get("tau")
        results["wall_time_s"] = manifest.get("wall_time_s")
    results["output"] = output
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capgap check-scores", description=__doc__)
    add_config_args(parser, CheckScoresConfig, default_config=None)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(CheckScoresConfig, args)
        results = check(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"capgap check-scores: {err}", file=sys.stderr)
        return 2
    ok_auroc = results["certainty_auroc"] >= cfg.auroc_target
    ok_rho = results["imbalance_spearman"] >= cfg.spearman_target
    print(f"rows scored: {results['rows']} ({results['mismatched']} mismatched)")
    print(
        f"certainty AUROC (matched vs mismatched): {results['certainty_auroc']:.4f} "
        f"[target >= {cfg.auroc_target}: {'PASS' if ok_auroc else 'FAIL'}]; "
        f"clip_score AUROC {results['clip_score_auroc']:.4f}"
    )
    print(
        f"Spearman(imbalance, {N_ATTRIBUTES} - k) over matched rows: "
        f"{results['imbalance_spearman']:.4f} "
        f"[target >= {cfg.spearman_target}: {'PASS' if ok_rho else 'FAIL'}]; "
        f"-clip_score {results['clip_score_spearman']:.4f}"
    )
    print(json.dumps(results, default=str))
    return 1 if cfg.strict and not (ok_auroc and ok_rho) else 0


if __name__ == "__main__":
    raise SystemExit(main())
