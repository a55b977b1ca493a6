"""Certainty and imbalance candidates, scored on the same embeddings (issue 16).

One ``capgap curate`` build of a labelled split (the ``web`` split: terse captions, some
mismatched) with every decision rule off, as ``capgap check-scores`` runs it, gives the
pipeline's own embeddings of every row (RunInference through
:class:`~capgap.models.clip_handler.ClipModelHandler`, capgap's decode and caption
normalisation), the bank exactly as the pipeline sampled it (:mod:`capgap.transforms.bank`:
``score.bank_size`` uid-hash-smallest pairs, images AND captions) and the pipeline's own
scores. They are kept in a temporary ``.npz`` (``--keep_embeddings`` keeps it,
``--embeddings`` reuses one). Every candidate is then computed on those same embeddings:
the existing ``score.certainty`` / ``score.imbalance`` options through
:func:`capgap.transforms.score.batch_scores` itself, the others here (formulas in
:data:`CERTAINTY_DOCS`, :data:`IMBALANCE_DOCS`). It prints and writes to ``--out``
(default ``docs/results/certainty/``; one section per ``--label``, earlier labels kept):

- certainty candidates x AUROC (matched vs mismatched; ``check_scores.auroc_by_k``)
  overall and per k, the number of attributes the caption names, with n / mismatched;
- imbalance candidates x Spearman(imbalance, A - k) over matched rows (as
  ``check-scores``), A the number of attributes;
- ``results.md``, ``results.csv``, ``summary.json``, ``plot.png`` (AUROC - clip_score
  AUROC per k, per candidate).

Checks: the pipeline's own certainty / clip_score / imbalance columns equal
``batch_scores`` on the extracted embeddings row for row, and their AUROCs per k equal
this script's; with ``--check_scores_json`` (the JSON line ``capgap check-scores --compare``
prints last) every existing option's AUROC per k must agree to ``--tolerance``.

    python benchmarks/certainty_candidates.py --reference demo_out/reference \\
        --data demo_out/data/web --label demo --check_scores_json check_scores.json
    python benchmarks/certainty_candidates.py --embeddings emb.npz --label demo  # no embedding
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from scipy.stats import rankdata

from capgap.core.files import expand_paths
from capgap.pipeline import check_scores, curate
from capgap.transforms.score import CERTAINTY_METHODS, ScoreConfig, batch_scores

N_ATTRIBUTES = check_scores.N_ATTRIBUTES
CHUNK = 1024  # rows scored together (a CHUNK x bank float64 matrix per score)


# --- embeddings: one curate build, its embedded rows and its bank ----------------------------


def _embedding_record(element: tuple[str, dict]) -> dict[str, Any]:
    uid, row = element
    return {
        "uid": uid,
        "image_embedding": np.asarray(row["image_embedding"], np.float32).tolist(),
        "text_embedding": np.asarray(row["text_embedding"], np.float32).tolist(),
    }


def _bank_records(bank: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "uid": uid,
            "image_embedding": bank["images"][i].tolist(),
            "text_embedding": bank["texts"][i].tolist(),
            "tau": float(bank["tau"]),
        }
        for i, uid in enumerate(bank["uids"])
    ]


def _vector_schema(*extra: pa.Field) -> pa.Schema:
    return pa.schema(
        [
            *extra,
            pa.field("uid", pa.string()),
            pa.field("image_embedding", pa.list_(pa.float32())),
            pa.field("text_embedding", pa.list_(pa.float32())),
        ]
    )


def _read_vectors(pattern: str) -> pa.Table:
    tables = [pq.read_table(p) for p in expand_paths([pattern])]
    return pa.concat_tables(tables)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    flat = column.combine_chunks()
    return np.asarray(flat.flatten(), dtype=np.float32).reshape(len(flat), -1)


def embed(
    reference: str, data: str, bank_size: int, workdir: str, beam_args: list[str]
) -> dict[str, np.ndarray]:
    """One curate build of ``data`` (decisions off) -> embeddings, bank and the build's scores.

    The graph is :func:`capgap.pipeline.curate.build`'s own, with two sinks added: its
    embedded rows and its bank side input, each to Parquet under ``workdir``.
    """
    output = os.path.join(workdir, "curate")
    cfg = check_scores.scoring_config(data, output, reference, bank_size)
    curate.validate(cfg)
    curate.prepare_output(cfg)
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    built = curate.build(p, cfg)
    _ = (
        built["embedded"]
        | "EmbeddingRecords" >> beam.Map(_embedding_record)
        | "WriteEmbeddings"
        >> beam.io.WriteToParquet(os.path.join(workdir, "embedded", "part"), _vector_schema())
    )
    _ = (
        built["bank"]
        | "BankRecords" >> beam.FlatMap(_bank_records)
        | "WriteBank"
        >> beam.io.WriteToParquet(
            os.path.join(workdir, "bank", "part"),
            _vector_schema(pa.field("index", pa.int64()), pa.field("tau", pa.float64())),
        )
    )
    p.run().wait_until_finish()

    scored = check_scores.read_scored(output)
    with open(os.path.join(output, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    rows = _read_vectors(os.path.join(workdir, "embedded", "part*"))
    position = {uid: i for i, uid in enumerate(rows.column("uid").to_pylist())}
    order = np.array([position[uid] for uid in scored["uid"].tolist()])
    bank = _read_vectors(os.path.join(workdir, "bank", "part*")).sort_by("index")
    if not bank.num_rows:
        raise SystemExit(f"the build sampled no bank from {data}: nothing to score against")
    return {
        "uid": scored["uid"],
        "mismatched": scored["mismatched"].astype(bool),
        "k": scored["k"].astype(np.int64),
        "images": _matrix(rows.column("image_embedding"))[order],
        "texts": _matrix(rows.column("text_embedding"))[order],
        "pipeline_clip_score": scored["clip_score"],
        "pipeline_certainty": scored["certainty"],
        "pipeline_imbalance": scored["imbalance"],
        "pipeline_certainty_method": np.asarray(manifest["config"]["score"]["certainty"]),
        "pipeline_imbalance_method": np.asarray(manifest["config"]["score"]["imbalance"]),
        "bank_uid": np.asarray(bank.column("uid").to_pylist()),
        "bank_images": _matrix(bank.column("image_embedding")),
        "bank_texts": _matrix(bank.column("text_embedding")),
        "tau": np.asarray(bank.column("tau")[0].as_py()),
    }


# --- the similarity views every candidate is built from --------------------------------------


@dataclasses.dataclass
class Views:
    """s_ii, S (caption -> bank images), R (image -> bank captions), own bank entry at -inf."""

    s: np.ndarray  # (N,)
    S: np.ndarray  # (N, n)
    R: np.ndarray  # (N, n)
    valid: np.ndarray  # (N, n) bool: False at the row's own bank entry
    texts: np.ndarray
    bank_texts: np.ndarray

    def topk_mean(self, which: str, k: int) -> np.ndarray:
        """Mean of each row's k largest valid entries (k capped at the valid count)."""
        m = self.S if which == "S" else self.R
        k = max(1, min(k, int(self.valid.sum(axis=1).min())))
        top = np.partition(m, m.shape[1] - k, axis=1)[:, -k:]
        return top.mean(axis=1)

    def quantile(self, which: str, q: float) -> np.ndarray:
        """Nearest-rank ``q`` quantile over each row's valid entries (as ``margin``)."""
        m = self.S if which == "S" else self.R
        n_eff = self.valid.sum(axis=1)
        rank = np.clip(np.ceil(q * n_eff).astype(np.int64) - 1, 0, None)
        position = rank + (m.shape[1] - n_eff)  # -inf entries sort first
        return np.sort(m, axis=1)[np.arange(len(m)), position]

    def text_topk_mean(self, k: int) -> np.ndarray:
        """Mean top-k of cos(caption_i, bank captions), own entry left out."""
        own = np.where(self.valid, self.texts @ self.bank_texts.T, -np.inf)
        k = max(1, min(k, int(self.valid.sum(axis=1).min())))
        return np.partition(own, own.shape[1] - k, axis=1)[:, -k:].mean(axis=1)

    def mean(self, which: str) -> np.ndarray:
        m = self.S if which == "S" else self.R
        return np.where(self.valid, m, 0.0).sum(axis=1) / self.valid.sum(axis=1)

    def log_p(self, which: str, tau: float) -> np.ndarray:
        """log softmax of s_ii among {s_ii} + the row of S (caption -> image) or R."""
        m = self.S if which == "S" else self.R
        logits = np.concatenate([self.s[:, None], m], axis=1) / tau
        return self.s / tau - logsumexp(logits, axis=1)


def views(data: Mapping[str, np.ndarray], exclude: list[int | None]) -> Views:
    images = data["images"].astype(np.float64)
    texts = data["texts"].astype(np.float64)
    bank_images = data["bank_images"].astype(np.float64)
    bank_texts = data["bank_texts"].astype(np.float64)
    S = texts @ bank_images.T
    R = images @ bank_texts.T
    valid = np.ones(S.shape, dtype=bool)
    rows = [i for i, j in enumerate(exclude) if j is not None]
    cols = [j for j in exclude if j is not None]
    valid[rows, cols] = False
    S[rows, cols] = -np.inf
    R[rows, cols] = -np.inf
    return Views(np.einsum("ij,ij->i", images, texts), S, R, valid, texts, bank_texts)


def scores_of(
    data: Mapping[str, np.ndarray], exclude: list[int | None], tau: float, **options: Any
) -> dict[str, np.ndarray]:
    """:func:`batch_scores` over every row (in chunks), with these ScoreConfig options."""
    cfg = ScoreConfig(**options)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(data["images"]), CHUNK):
        out = batch_scores(
            data["images"][start : start + CHUNK],
            data["texts"][start : start + CHUNK],
            data["bank_images"],
            tau,
            cfg,
            exclude[start : start + CHUNK],
            bank_texts=data["bank_texts"],
        )
        for name, values in out.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


def rank_average(*scores: np.ndarray) -> np.ndarray:
    return np.mean([rankdata(s) for s in scores], axis=0) / len(scores[0])


def ols_residual(y: np.ndarray, *x: np.ndarray) -> np.ndarray:
    """y minus its least-squares fit on [1, x...] over all rows (no labels)."""
    design = np.column_stack([np.ones_like(y), *x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return y - design @ coef


def binned_z(y: np.ndarray, by: np.ndarray, bins: int = 10) -> np.ndarray:
    """y standardised within ``bins`` equal-count bins of ``by`` (ties kept in one bin)."""
    ranks = rankdata(by, method="min") - 1
    group = np.minimum((ranks * bins) // len(by), bins - 1)
    z = np.empty_like(y)
    for g in np.unique(group):
        sel = group == g
        sd = y[sel].std()
        z[sel] = (y[sel] - y[sel].mean()) / (sd if sd > 0 else 1.0)
    return z


def fitted_tau(v: Views, tau: float) -> float:
    """The temperature that minimises the rows' mean symmetric contrastive loss against the
    bank (label-free: every input row counts as a pair), within [tau / 16, 16 tau]."""

    def loss(log_tau: float) -> float:
        t = float(np.exp(log_tau))
        return float(-(v.log_p("S", t) + v.log_p("R", t)).mean() / 2)

    bounds = (np.log(tau / 16), np.log(tau * 16))
    fit = minimize_scalar(loss, bounds=bounds, method="bounded", options={"xatol": 1e-3})
    return float(np.exp(fit.x))


def delong(
    scores: Mapping[str, np.ndarray], positive: np.ndarray
) -> tuple[dict[str, float], np.ndarray]:
    """AUROCs and their covariance matrix (DeLong et al. 1988, with midranks as in Sun & Xu
    2014), for paired comparisons of scores on the same rows."""
    names = list(scores)
    pos, neg = np.asarray(positive, bool), ~np.asarray(positive, bool)
    m, n = int(pos.sum()), int(neg.sum())
    v01, v10, aucs = [], [], {}
    for name in names:
        x, y = scores[name][pos], scores[name][neg]
        tz = rankdata(np.concatenate([x, y]))
        tx, ty = rankdata(x), rankdata(y)
        aucs[name] = float(tz[:m].sum() / (m * n) - (m + 1) / (2 * n))
        v01.append((tz[:m] - tx) / n)
        v10.append(1.0 - (tz[m:] - ty) / m)
    if m < 2 or n < 2:  # no variance estimate from one row
        return aucs, np.full((len(names), len(names)), np.nan)
    cov = np.cov(np.asarray(v01)) / m + np.cov(np.asarray(v10)) / n
    return aucs, np.atleast_2d(cov)


def paired_deltas(
    scores: Mapping[str, np.ndarray], positive: np.ndarray, base: str
) -> dict[str, tuple[float, float]]:
    """(AUROC - AUROC of ``base``, its DeLong standard error) per score."""
    if positive.all() or not positive.any():
        return {name: (float("nan"), float("nan")) for name in scores}
    aucs, cov = delong(scores, positive)
    names = list(scores)
    b = names.index(base)
    out = {}
    for i, name in enumerate(names):
        var = cov[i, i] + cov[b, b] - 2 * cov[i, b]
        out[name] = (aucs[name] - aucs[base], float(np.sqrt(max(var, 0.0))))
    return out


# --- the candidates ---------------------------------------------------------------------------

# name -> formula, as the tables print it. s = s_ii = cos(image_i, caption_i); S_ij =
# cos(caption_i, bank image j); R_ij = cos(image_i, bank caption j); own bank entry left out.
CERTAINTY_DOCS: dict[str, str] = {
    "clip_score": "s (the baseline; `clip` = (1 + s) / 2 ranks the same)",
    "dual_softmax": "score.certainty=dual_softmax (default): sigma(log(1+n) - symmetric InfoNCE "
    "loss at the model's tau)",
    "margin": "score.certainty=margin: exp(min(0, s - q99(S_i)) / tau)",
    "rank": "score.certainty=rank: share of bank images the caption ranks below its own",
    "dual_softmax_tau_x0.25": "dual_softmax at tau / 4",
    "dual_softmax_tau_x0.5": "dual_softmax at tau / 2",
    "dual_softmax_tau_x2": "dual_softmax at 2 tau",
    "dual_softmax_tau_x4": "dual_softmax at 4 tau",
    "dual_softmax_tau_fit": "dual_softmax at the tau minimising the rows' mean loss (no labels)",
    "softmax_c2i": "log p(image_i | caption_i) over the bank images (one direction)",
    "softmax_i2c": "log p(caption_i | image_i) over the bank captions (one direction)",
    "csls_5": "2 s - mean top-5 of R_i - mean top-5 of S_i",
    "csls_10": "2 s - mean top-10 of R_i - mean top-10 of S_i",
    "csls_20": "2 s - mean top-20 of R_i - mean top-20 of S_i",
    "bimargin_max": "s - (max_j S_ij + max_j R_ij) / 2",
    "bimargin_q99": "s - (q99(S_i) + q99(R_i)) / 2",
    "bimargin_min": "s - max(max_j S_ij, max_j R_ij)",
    "clip_z_ambiguity": "s standardised within 10 equal-count bins of ambiguity",
    "clip_z_cap_top10": "s standardised within 10 equal-count bins of mean top-10 of S_i",
    "clip_resid_cap_top10": "s minus its OLS fit on mean top-10 of S_i (all rows, no labels)",
    "clip_resid_both_top10": "s minus its OLS fit on mean top-10 of S_i and of R_i",
    "clip_z_cap_top10_txt": "s standardised within 10 equal-count bins of cap_top10_txt "
    "(the caption's mean top-10 similarity to bank captions: how generic it is)",
    "clip_resid_cap_top10_txt": "s minus its OLS fit on cap_top10_txt",
    "rankavg_dual_softmax_clip": "mean rank of dual_softmax and s",
    "rankavg_csls10_clip": "mean rank of csls_10 and s",
}

IMBALANCE_DOCS: dict[str, str] = {
    "ambiguity": "score.imbalance=ambiguity (default): log(1 + #{S_ij >= s}) / log(1 + n)",
    "entropy": "score.imbalance=entropy: normalised entropy of softmax({s} + S_i / tau)",
    "entropy_tau_x2": "entropy at 2 tau",
    "entropy_tau_x0.5": "entropy at tau / 2",
    "entropy_tau_x0.25": "entropy at tau / 4",
    "soft_ambiguity": "-log p(image_i | caption_i) / log(1 + n) (softmax at tau)",
    "cap_top5_img": "mean top-5 of S_i (the caption's best bank images)",
    "cap_top10_img": "mean top-10 of S_i",
    "cap_top50_img": "mean top-50 of S_i",
    "cap_mean_img": "mean of S_i over the bank images",
    "cap_centroid_txt": "cos(caption_i, normalised mean bank caption)",
    "cap_top10_txt": "mean top-10 of cos(caption_i, bank captions) (text only: how generic)",
    "cap_top50_txt": "mean top-50 of cos(caption_i, bank captions)",
    "top10_minus_s": "mean top-10 of S_i - s",
    "neg_clip_score": "-s (check-scores' baseline)",
    "rankavg_ambiguity_centroid": "mean rank of ambiguity and cap_centroid_txt",
    "rankavg_ambiguity_top10": "mean rank of ambiguity and cap_top10_img",
}


def certainty_candidates(
    data: Mapping[str, np.ndarray], v: Views, exclude: list[int | None], tau: float
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    out: dict[str, np.ndarray] = {}
    out["clip_score"] = scores_of(data, exclude, tau, certainty="clip")["clip_score"]
    for method in CERTAINTY_METHODS:
        if method != "clip":
            out[method] = scores_of(data, exclude, tau, certainty=method)["certainty"]
    for factor in (0.25, 0.5, 2, 4):
        out[f"dual_softmax_tau_x{factor:g}"] = scores_of(data, exclude, tau * factor)["certainty"]
    tau_fit = fitted_tau(v, tau)
    out["dual_softmax_tau_fit"] = scores_of(data, exclude, tau_fit)["certainty"]
    out["softmax_c2i"] = v.log_p("S", tau)
    out["softmax_i2c"] = v.log_p("R", tau)
    for k in (5, 10, 20):
        out[f"csls_{k}"] = 2 * v.s - v.topk_mean("R", k) - v.topk_mean("S", k)
    s_max, r_max = v.S.max(axis=1), v.R.max(axis=1)
    out["bimargin_max"] = v.s - (s_max + r_max) / 2
    out["bimargin_q99"] = v.s - (v.quantile("S", 0.99) + v.quantile("R", 0.99)) / 2
    out["bimargin_min"] = v.s - np.maximum(s_max, r_max)
    ambiguity = scores_of(data, exclude, tau)["imbalance"]
    cap_top10, img_top10 = v.topk_mean("S", 10), v.topk_mean("R", 10)
    out["clip_z_ambiguity"] = binned_z(v.s, ambiguity)
    out["clip_z_cap_top10"] = binned_z(v.s, cap_top10)
    out["clip_resid_cap_top10"] = ols_residual(v.s, cap_top10)
    out["clip_resid_both_top10"] = ols_residual(v.s, cap_top10, img_top10)
    generic = v.text_topk_mean(10)
    out["clip_z_cap_top10_txt"] = binned_z(v.s, generic)
    out["clip_resid_cap_top10_txt"] = ols_residual(v.s, generic)
    out["rankavg_dual_softmax_clip"] = rank_average(out["dual_softmax"], out["clip_score"])
    out["rankavg_csls10_clip"] = rank_average(out["csls_10"], out["clip_score"])
    assert list(out) == list(CERTAINTY_DOCS), "CERTAINTY_DOCS out of step"
    return out, {"tau": tau, "tau_fit": tau_fit}


def imbalance_candidates(
    data: Mapping[str, np.ndarray], v: Views, exclude: list[int | None], tau: float
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    out["ambiguity"] = scores_of(data, exclude, tau, imbalance="ambiguity")["imbalance"]
    out["entropy"] = scores_of(data, exclude, tau, imbalance="entropy")["imbalance"]
    out["entropy_tau_x2"] = scores_of(data, exclude, 2 * tau, imbalance="entropy")["imbalance"]
    for factor in (0.5, 0.25):
        out[f"entropy_tau_x{factor:g}"] = scores_of(
            data, exclude, tau * factor, imbalance="entropy"
        )["imbalance"]
    out["soft_ambiguity"] = -v.log_p("S", tau) / np.log1p(v.valid.sum(axis=1))
    for k in (5, 10, 50):
        out[f"cap_top{k}_img"] = v.topk_mean("S", k)
    out["cap_mean_img"] = v.mean("S")
    centroid = v.bank_texts.mean(axis=0)
    out["cap_centroid_txt"] = v.texts @ (centroid / np.linalg.norm(centroid))
    for k in (10, 50):
        out[f"cap_top{k}_txt"] = v.text_topk_mean(k)
    out["top10_minus_s"] = out["cap_top10_img"] - v.s
    out["neg_clip_score"] = -v.s
    out["rankavg_ambiguity_centroid"] = rank_average(out["ambiguity"], out["cap_centroid_txt"])
    out["rankavg_ambiguity_top10"] = rank_average(out["ambiguity"], out["cap_top10_img"])
    assert list(out) == list(IMBALANCE_DOCS), "IMBALANCE_DOCS out of step"
    return out


# --- checks against the pipeline and check-scores ---------------------------------------------


def _by_k_map(table: list[dict]) -> dict[str, dict[str, float | None]]:
    return {str(row["k"]): row["auroc"] for row in table}


def verify(
    data: Mapping[str, np.ndarray],
    certainty: Mapping[str, np.ndarray],
    imbalance: Mapping[str, np.ndarray],
    by_k: list[dict],
    check_json: dict | None,
) -> dict[str, Any]:
    """Row-for-row and AUROC agreement with the build's own scores and with check-scores."""
    method = str(data["pipeline_certainty_method"])
    imb_method = str(data["pipeline_imbalance_method"])
    checks: dict[str, Any] = {
        "pipeline_certainty_method": method,
        "max_abs_row_diff": {
            "clip_score": float(
                np.abs(certainty["clip_score"] - data["pipeline_clip_score"]).max()
            ),
            method: float(np.abs(certainty[method] - data["pipeline_certainty"]).max()),
            f"imbalance:{imb_method}": float(
                np.abs(imbalance[imb_method] - data["pipeline_imbalance"]).max()
            ),
        },
    }
    pipeline_table = check_scores.evaluate(
        {
            "certainty": data["pipeline_certainty"],
            "clip_score": data["pipeline_clip_score"],
            "imbalance": data["pipeline_imbalance"],
            "mismatched": data["mismatched"],
            "k": data["k"],
        }
    )
    mine = _by_k_map(by_k)

    def max_diff(theirs: dict[str, dict[str, float | None]], names: Mapping[str, str]) -> float:
        diffs = [0.0]
        for k, row in theirs.items():
            for their_name, my_name in names.items():
                a, b = row.get(their_name), mine[k][my_name]
                if a is None or b is None:
                    if (a is None) != (b is None):
                        diffs.append(float("inf"))
                    continue
                diffs.append(abs(a - b))
        return max(diffs)

    checks["pipeline_auroc_max_diff"] = max_diff(
        _by_k_map(pipeline_table["by_k"]), {"certainty": method, "clip_score": "clip_score"}
    )
    checks["pipeline_spearman"] = pipeline_table["imbalance_spearman"]
    if check_json is not None:
        their_method = check_json.get("certainty_method", "dual_softmax")
        names = {"certainty": their_method, "clip_score": "clip_score"}
        for other in check_json.get("compare", {}):
            if other != their_method:
                names[other] = "clip_score" if other == "clip" else other
        checks["check_scores_columns"] = sorted(set(names.values()))
        checks["check_scores_auroc_max_diff"] = max_diff(_by_k_map(check_json["by_k"]), names)
        checks["check_scores_rows"] = check_json.get("rows")
        checks["check_scores_spearman"] = check_json.get("imbalance_spearman")
    return checks


def read_check_json(path: str) -> dict:
    """The last JSON object line of a file (``capgap check-scores`` output, or the line)."""
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh.read().splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{path}: no JSON line (capgap check-scores prints it last)")
    return json.loads(lines[-1])


# --- outputs ----------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def section_md(label: str, summary: dict[str, Any]) -> str:
    by_k = [row for row in summary["by_k"] if row["n"] > 0]
    names = list(summary["certainty_docs"])
    head = " | ".join(f"k={row['k']} ({row['n']}/{row['mismatched']})" for row in by_k)
    lines = [
        f"## {label}: {summary['reference']}",
        "",
        *([summary["note"], ""] if summary.get("note") else []),
        f"{summary['rows']} rows ({summary['mismatched']} mismatched) of `{summary['data']}`; "
        f"bank {summary['bank_size']} pairs, model tau {summary['tau']:.5f} "
        f"(fitted tau {summary['tau_fit']:.5f}). Columns: AUROC matched vs mismatched, per "
        "k (n / mismatched); `min d(clip) (z)`: the smallest AUROC - clip_score AUROC over "
        "the k buckets and overall, and that difference over its paired DeLong standard "
        "error; `d(dual) +- SE`: overall AUROC - dual_softmax's, with its SE; `*` marks "
        "candidates that beat dual_softmax overall and are not below clip_score in any k "
        "bucket.",
        "",
        "| certainty | " + head + " | min d(clip) (z) | d(dual) +- SE | |",
        "|---" * (len(by_k) + 4) + "|",
    ]
    for name in names:
        cells = [_fmt(row["auroc"][name]) for row in by_k]
        flag = "*" if name in summary["qualifies"] else ""
        worst = min(summary["delta_clip"][name].values(), key=lambda ds: ds[0])
        z = f"{worst[0] / worst[1]:+.1f}" if worst[1] > 0 else "-"
        dd, dse = summary["delta_dual_softmax"][name]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {worst[0]:+.4f} ({z}) "
            f"| {dd:+.4f} +- {dse:.4f} | {flag} |"
        )
    best = summary["best_overall"]
    qualifying = ", ".join(summary["qualifies"]) or "none"
    lines += [
        "",
        f"Highest overall AUROC: {best} {summary['auroc'][best]:.4f}. Beat dual_softmax "
        f"overall and clip_score in every k bucket: {qualifying}.",
    ]
    lines += [
        "",
        f"Imbalance: Spearman(imbalance, {N_ATTRIBUTES} - k) over the "
        f"{summary['matched']} matched rows (as `capgap check-scores`).",
        "",
        "| imbalance | Spearman |",
        "|---|---|",
    ]
    for name, rho in summary["imbalance_spearman"].items():
        lines.append(f"| {name} | {_fmt(rho, 3)} |")
    rhos = summary["imbalance_spearman"]
    top = max(rhos, key=lambda n: -np.inf if rhos[n] is None else rhos[n])
    lines += [
        "",
        f"Highest Spearman: {top} {rhos[top]:.3f} (ambiguity, the default: "
        f"{rhos['ambiguity']:.3f}).",
    ]
    lines += ["", "Checks: " + json.dumps(summary["checks"]), ""]
    return "\n".join(lines)


def write_outputs(out: Path, results: dict[str, dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    first = next(iter(results.values()))
    docs = ["## Candidates", ""]
    docs += [f"- `{n}`: {d}" for n, d in first["certainty_docs"].items()]
    docs += ["", "Imbalance:", ""]
    docs += [f"- `{n}`: {d}" for n, d in first["imbalance_docs"].items()]
    body = "\n\n".join(section_md(label, s) for label, s in results.items())
    commands = "\n".join(f"    {s['command']}" for s in results.values())
    (out / "results.md").write_text(
        "# certainty and imbalance candidates (issue 16)\n\n"
        "s = cos(image_i, caption_i), S_ij = cos(caption_i, bank image j), R_ij = "
        "cos(image_i, bank caption j), the row's own bank entry left out. Written by\n\n"
        f"{commands}\n\n{body}\n" + "\n".join(docs) + "\n"
    )
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["reference", "kind", "candidate", "k", "n", "mismatched", "value"])
        for label, s in results.items():
            for row in s["by_k"]:
                for name, value in row["auroc"].items():
                    writer.writerow(
                        [
                            label,
                            "certainty_auroc",
                            name,
                            row["k"],
                            row["n"],
                            row["mismatched"],
                            value,
                        ]
                    )
            for name, rho in s["imbalance_spearman"].items():
                writer.writerow([label, "imbalance_spearman", name, "all", s["matched"], 0, rho])
    plot(out / "plot.png", results)


def plot(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """Per reference: AUROC - clip_score AUROC per k bucket (DeLong SE bars on the named
    candidates, the rest thin grey), and the imbalance candidates' Spearman."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [
        "dual_softmax",
        "margin",
        "rank",
        "softmax_i2c",
        "csls_10",
        "bimargin_q99",
        "clip_z_cap_top10_txt",
        "rankavg_dual_softmax_clip",
    ]
    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(
        2, len(results), figsize=(7 * len(results), 9), squeeze=False, height_ratios=[1.2, 1]
    )
    for column, (label, s) in enumerate(results.items()):
        ax = axes[0, column]
        rows = [row for row in s["by_k"] if row["n"] > 0]
        xs = np.arange(len(rows))
        shown = [n for n in named if n in s["certainty_docs"]] + [
            n for n in s["qualifies"] if n not in named
        ]
        low, high = 0.0, 0.0
        for name in s["certainty_docs"]:
            if name == "clip_score" or name in shown:
                continue
            ys = [s["delta_clip"][name][str(row["k"])][0] for row in rows]
            ax.plot(xs, ys, color="0.7", lw=0.7, zorder=1)
        for i, name in enumerate(shown):
            ds = [s["delta_clip"][name][str(row["k"])] for row in rows]
            ys, es = np.array([d for d, _ in ds]), np.array([e for _, e in ds])
            low, high = min(low, (ys - es).min()), max(high, (ys + es).max())
            ax.errorbar(
                xs + (i - len(shown) / 2) * 0.03,
                ys,
                yerr=es,
                marker="o",
                ms=3,
                lw=1.4,
                capsize=2,
                color=colours[i % 10],
                label=name,
                zorder=2,
            )
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(xs, [f"{row['k']}\n({row['n']}/{row['mismatched']})" for row in rows])
        ax.set_xlabel("k, attributes named (rows / mismatched); grey: other candidates")
        ax.set_ylabel("AUROC - clip_score AUROC (+- DeLong SE)")
        ax.set_title(f"{label}: clip_score AUROC {s['auroc']['clip_score']:.4f} overall")
        pad = 0.25 * (high - low)
        ax.set_ylim(low - pad, high + pad)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", ncol=2)

        ax = axes[1, column]
        names = list(s["imbalance_spearman"])
        values = [s["imbalance_spearman"][n] for n in names]
        ax.barh(names, values, color=["C0" if v >= 0.6 else "0.6" for v in values])
        ax.axvline(0.6, color="r", lw=0.8, ls="--")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel(f"Spearman(imbalance, {N_ATTRIBUTES} - k), matched rows (target 0.6)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------


def evaluate_all(data: Mapping[str, np.ndarray], check_json: dict | None) -> dict[str, Any]:
    index = {str(uid): i for i, uid in enumerate(data["bank_uid"].tolist())}
    exclude = [index.get(str(uid)) for uid in data["uid"].tolist()]
    tau = float(data["tau"])
    v = views(data, exclude)
    certainty, extra = certainty_candidates(data, v, exclude, tau)
    imbalance = imbalance_candidates(data, v, exclude, tau)
    mismatched, k = data["mismatched"], data["k"]
    matched = ~mismatched
    by_k = check_scores.auroc_by_k(k, mismatched, certainty)
    overall = by_k[-1]["auroc"]
    delta_clip: dict[str, dict[str, list[float]]] = {name: {} for name in certainty}
    for row in by_k:
        rows = np.ones(len(k), bool) if row["k"] == "all" else k == row["k"]
        if row["auroc"]["clip_score"] is None:
            continue
        deltas = paired_deltas(
            {n: c[rows] for n, c in certainty.items()}, matched[rows], "clip_score"
        )
        for name, (d, se) in deltas.items():
            delta_clip[name][str(row["k"])] = [d, se]
    delta_dual = paired_deltas(certainty, matched, "dual_softmax")
    min_delta = {name: min(d for d, _ in delta_clip[name].values()) for name in certainty}
    qualifies = [
        name
        for name in certainty
        if overall[name] > overall["dual_softmax"] and min_delta[name] >= 0
    ]
    omitted = N_ATTRIBUTES - k
    spearman = {
        name: check_scores.spearman(values[matched], omitted[matched])
        for name, values in imbalance.items()
    }
    return {
        "rows": int(len(k)),
        "mismatched": int(mismatched.sum()),
        "matched": int(matched.sum()),
        "bank_size": int(len(data["bank_uid"])),
        "excluded_own": int(sum(j is not None for j in exclude)),
        **extra,
        "auroc": overall,
        "by_k": by_k,
        "min_delta_clip": min_delta,
        "delta_clip": delta_clip,
        "delta_dual_softmax": {name: list(v) for name, v in delta_dual.items()},
        "qualifies": qualifies,
        "best_overall": max(overall, key=lambda n: overall[n]),
        "imbalance_spearman": spearman,
        "certainty_docs": CERTAINTY_DOCS,
        "imbalance_docs": IMBALANCE_DOCS,
        "checks": verify(data, certainty, imbalance, by_k, check_json),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="`capgap train` run dir")
    parser.add_argument("--data", help="labelled split (dir or glob), e.g. demo_out/data/web")
    parser.add_argument("--label", default="demo", help="section name in the outputs")
    parser.add_argument("--bank_size", type=int, default=2048)
    parser.add_argument("--out", default="docs/results/certainty")
    parser.add_argument("--embeddings", help="reuse a --keep_embeddings .npz (no curate run)")
    parser.add_argument("--keep_embeddings", help="save the extracted embeddings here (.npz)")
    parser.add_argument("--check_scores_json", help="`capgap check-scores --compare` output")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--note", default="", help="a line on the reference, for results.md")
    parser.add_argument("--beam_arg", action="append", default=[], help="e.g. --runner=...")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.embeddings:
        data = dict(np.load(args.embeddings, allow_pickle=False))
        source = json.loads(str(data.pop("source")))
    else:
        if not (args.reference and args.data):
            parser.error("pass --reference and --data (or --embeddings)")
        workdir = tempfile.mkdtemp(prefix="capgap-certainty-")
        try:
            data = embed(args.reference, args.data, args.bank_size, workdir, args.beam_arg)
            source = {"reference": args.reference, "data": args.data}
            cache = args.keep_embeddings or os.path.join(workdir, "embeddings.npz")
            np.savez(cache, source=np.asarray(json.dumps(source)), **data)
        finally:
            if not args.keep_embeddings:
                shutil.rmtree(workdir, ignore_errors=True)
    embedded_s = time.perf_counter() - started
    check_json = read_check_json(args.check_scores_json) if args.check_scores_json else None
    summary = evaluate_all(data, check_json)
    summary.update(source)
    # The command that embeds afresh (an --embeddings run gives the same numbers).
    command = ["python benchmarks/certainty_candidates.py"]
    command += [f"--reference {source['reference']}", f"--data {source['data']}"]
    command += [f"--label {args.label}", f"--bank_size {args.bank_size}"]
    if args.check_scores_json:
        command.append(f"--check_scores_json {args.check_scores_json}")
    summary["command"] = " ".join(command)
    summary["note"] = args.note
    summary["embed_s"] = round(embedded_s, 1)
    summary["score_s"] = round(time.perf_counter() - started - embedded_s, 1)

    out = Path(args.out)
    results: dict[str, dict[str, Any]] = {}
    if (out / "summary.json").exists():
        results = json.loads((out / "summary.json").read_text())
    results[args.label] = summary
    write_outputs(out, results)
    print(section_md(args.label, summary))
    checks = summary["checks"]
    worst = max([checks["pipeline_auroc_max_diff"], checks.get("check_scores_auroc_max_diff", 0.0)])
    print(f"embedding {embedded_s:.0f} s, scoring {summary['score_s']:.0f} s -> {out}")
    if worst > args.tolerance:
        print(f"AUROCs differ from the pipeline / check-scores by {worst:.2g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
