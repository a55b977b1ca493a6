"""``capgap check-scores``: validate certainty and imbalance against the synthetic ground truth.

Runs ``capgap curate`` on a labelled split (the ``web`` split: terse captions, some
mismatched) with every decision rule off, so each valid row lands in ``curated/``
with its scores, then measures

- certainty AUROC: how well ``certainty`` separates matched from ``mismatched``
  pairs (target >= 0.95; ``clip_score``'s AUROC is printed as the baseline);
- the same AUROCs per k, the number of attributes the caption names (0 .. A), as a
  table: a terse caption fits many images, so a certainty that mistakes terse for
  wrong shows up in the low-k rows. With ``--compare`` every other ``score.certainty``
  option gets a column too, each from one more curate run (scores need the
  embeddings, which curate does not write);
- Spearman(imbalance, A - k) over matched rows, where A - k is the number of
  attributes the caption leaves out (target >= 0.6).

The reference CLIP is a ``capgap train`` run (e.g. trained on the ``seed`` split).

    capgap check-scores --reference runs/seed --data data/synth/web
    capgap check-scores --reference runs/seed --data data/synth/web --compare
    capgap check-scores --curated out/web          # check an existing curate output
    capgap check-scores --reference runs/seed --data data/synth/web --set curate_set='["score.certainty=rank"]'
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from capgap.transforms.score import CERTAINTY_METHODS

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
    compare: bool = field(
        default=False,
        metadata={"help": "also curate once per other score.certainty option, AUROC each"},
    )
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


def auroc_by_k(
    k: np.ndarray, mismatched: np.ndarray, scores: Mapping[str, np.ndarray]
) -> list[dict]:
    """Rows k = 0 .. A and ``"all"``: n, mismatched and each score's AUROC (matched vs
    mismatched, :func:`auroc`; None where a class is empty) over the rows with that k."""
    k = np.asarray(k, dtype=np.int64)
    mismatched = np.asarray(mismatched, dtype=bool)
    table = []
    for key in [*range(N_ATTRIBUTES + 1), "all"]:
        rows = np.ones(len(k), dtype=bool) if key == "all" else k == key
        aurocs = {
            name: auroc(np.asarray(values)[rows], ~mismatched[rows])
            for name, values in scores.items()
        }
        table.append(
            {
                "k": key,
                "n": int(rows.sum()),
                "mismatched": int(mismatched[rows].sum()),
                "auroc": {name: None if math.isnan(v) else v for name, v in aurocs.items()},
            }
        )
    return table


def format_by_k(table: list[dict], headers: Mapping[str, str] | None = None) -> str:
    """:func:`auroc_by_k` as aligned text, one column per score (``headers`` renames)."""
    names = list(table[0]["auroc"]) if table else []
    heads = [(headers or {}).get(name, name) for name in names]
    widths = [max(6, len(h)) for h in heads]
    lines = [
        f"{'k':>3}  {'n':>6}  {'mismatched':>10}  "
        + "  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))
    ]
    for row in table:
        cells = [
            "-" if row["auroc"][name] is None else f"{row['auroc'][name]:.4f}" for name in names
        ]
        lines.append(
            f"{row['k']!s:>3}  {row['n']:>6}  {row['mismatched']:>10}  "
            + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
        )
    return "\n".join(lines)


def evaluate(
    scored: dict[str, np.ndarray], others: Mapping[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """The two acceptance numbers plus baselines, and the AUROCs per k (``by_k``) of
    certainty, clip_score and ``others`` (e.g. other certainty options, row for row)."""
    mismatched = scored["mismatched"].astype(bool)
    matched = ~mismatched
    omitted = N_ATTRIBUTES - scored["k"].astype(np.int64)
    columns = {"certainty": scored["certainty"], "clip_score": scored["clip_score"]}
    columns.update(others or {})
    return {
        "rows": int(len(mismatched)),
        "mismatched": int(mismatched.sum()),
        "certainty_auroc": auroc(scored["certainty"], matched),
        "clip_score_auroc": auroc(scored["clip_score"], matched),
        "imbalance_spearman": spearman(scored["imbalance"][matched], omitted[matched]),
        "clip_score_spearman": spearman(-scored["clip_score"][matched], omitted[matched]),
        "certainty_spearman": spearman(-scored["certainty"][matched], omitted[matched]),
        "by_k": auroc_by_k(scored["k"], mismatched, columns),
    }


def scoring_config(
    data: str, out: str, reference: str | None, bank_size: int, extra: Sequence[str] = ()
) -> curate.CurateConfig:
    """The curate config that scores every row of ``data`` into ``out``: decision rules off."""
    if os.path.isdir(data) and not os.path.exists(os.path.join(data, "dataset_info.json")):
        data = os.path.join(data, "*.parquet")
    overrides = [
        "decide.drop.mode=off",
        "decide.drop_clip.mode=off",
        "decide.recaption.mode=off",
        f"score.bank_size={bank_size}",
        *extra,
    ]
    values = {"input": data, "output": out, "reference": reference, "overwrite": True}
    return load_config(curate.CurateConfig, "curate", overrides, values=values)


def run_curate(cfg: CheckScoresConfig, out: str, extra: Sequence[str] = ()) -> None:
    """Curate ``cfg.data`` into ``out`` with every decision rule off (all rows scored)."""
    extra = [*cfg.curate_set, *extra]
    curate_cfg = scoring_config(cfg.data, out, cfg.reference, cfg.bank_size, extra)
    curate.run_config(curate_cfg, cfg.beam_args)


def compare_certainty(
    cfg: CheckScoresConfig, uids: np.ndarray, skip: str | None
) -> dict[str, np.ndarray]:
    """Certainty of every ``score.certainty`` option but ``skip``, one curate run each (in a
    temporary folder, removed after), aligned with ``uids``."""
    if not cfg.reference:
        raise ConfigError("--compare re-runs curate: pass --reference RUN_DIR (and --data)")
    position = {uid: i for i, uid in enumerate(uids.tolist())}
    others = {}
    for method in CERTAINTY_METHODS:
        if method == skip:
            continue
        out = tempfile.mkdtemp(prefix=f"capgap-check-scores-{method}-")
        try:
            run_curate(cfg, out, [f"score.certainty={method}"])
            scored = read_scored(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        values = np.full(len(uids), np.nan)
        for uid, value in zip(scored["uid"].tolist(), scored["certainty"], strict=True):
            if uid in position:
                values[position[uid]] = value
        if np.isnan(values).any():
            raise ValueError(f"--compare: the {method} run did not score every row")
        others[method] = values
    return others


def check(cfg: CheckScoresConfig) -> dict[str, Any]:
    if cfg.curated:
        output = cfg.curated
    else:
        if not cfg.reference:
            raise ConfigError("pass --reference RUN_DIR (or --curated OUTPUT)")
        output = cfg.out or tempfile.mkdtemp(prefix="capgap-check-scores-")
        run_curate(cfg, output)
    scored = read_scored(output)
    manifest_path = posixpath.join(output, MANIFEST)
    manifest = None
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    method = manifest["config"]["score"]["certainty"] if manifest else None
    others = compare_certainty(cfg, scored["uid"], method) if cfg.compare else None
    results = evaluate(scored, others)
    if manifest:
        results["certainty_method"] = method
        results["bank_size"] = manifest.get("bank", {}).get("size")
        results["tau"] = manifest.get("bank", {}).get("tau")
        results["wall_time_s"] = manifest.get("wall_time_s")
    if others:
        overall = results["by_k"][-1]["auroc"]
        results["compare"] = {name: overall[name] for name in others}
        if method:
            results["compare"][method] = results["certainty_auroc"]
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
    method = results.get("certainty_method")
    print("AUROC (matched vs mismatched) by k, the number of attributes the caption names:")
    print(format_by_k(results["by_k"], {"certainty": f"certainty({method or '?'})"}))
    print(json.dumps(results, default=str))
    return 1 if cfg.strict and not (ok_auroc and ok_rho) else 0


if __name__ == "__main__":
    raise SystemExit(main())
