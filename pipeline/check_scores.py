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

import json
import os
import posixpath
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from capgap.core import world
from capgap.core.config import (
    ConfigError,
    add_config_args,
    command_parser,
    config_from_args,
    load_config,
)
from capgap.core.files import expand_paths
from capgap.pipeline import curate
from capgap.transforms.schema import CURATED, MANIFEST, REJECTED

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


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half
    (``sklearn.metrics.roc_auc_score``); NaN when either class is empty."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``, average ranks for ties); NaN when either
    side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def read_scored(output: str) -> dict[str, np.ndarray]:
    """uid, scores and ground truth of every scored row under a curate output."""
    folders = [posixpath.join(output, CURATED), posixpath.join(output, REJECTED)]
    paths = expand_paths(folders, allow_empty=True)
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
    """Curate ``cfg.data`` into ``out`` with every decision rule off (all rows scored)."""
    data = cfg.data
    if os.path.isdir(data) and not os.path.exists(os.path.join(data, "dataset_info.json")):
        data = os.path.join(data, "*.parquet")
    overrides = [
        "decide.drop.mode=off",
        "decide.drop_clip.mode=off",
        "decide.recaption.mode=off",
        f"score.bank_size={cfg.bank_size}",
        *cfg.curate_set,
    ]
    values = {"input": data, "output": out, "reference": cfg.reference, "overwrite": True}
    curate_cfg = load_config(curate.CurateConfig, "curate", overrides, values=values)
    curate.run_config(curate_cfg, cfg.beam_args)


def check(cfg: CheckScoresConfig) -> dict[str, float]:
    if cfg.curated:
        output = cfg.curated
    else:
        if not cfg.reference:
            raise ConfigError("pass --reference RUN_DIR (or --curated OUTPUT)")
        output = cfg.out or tempfile.mkdtemp(prefix="capgap-check-scores-")
        run_curate(cfg, output)
    results = evaluate(read_scored(output))
    manifest_path = posixpath.join(output, MANIFEST)
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
    parser = command_parser("capgap check-scores", __doc__)
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
