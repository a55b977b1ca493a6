"""``benchmarks/certainty_candidates.py``: the embeddings it takes out of a curate build are
the ones the build scored, and its AUROCs and DeLong errors are the usual ones.

One tiny curate build (a random-init micro CLIP, 40 synthetic rows, a bank of 8).

    .venv/bin/python -m pytest -q tests/test_certainty_candidates.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from capgap.pipeline import check_scores
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row
from capgap.transforms.score import CERTAINTY_METHODS

_spec = importlib.util.spec_from_file_location(
    "certainty_candidates",
    Path(__file__).resolve().parents[1] / "benchmarks" / "certainty_candidates.py",
)
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)

N_ROWS, BANK = 40, 8


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    split = SplitConfig(n=N_ROWS, k_weights=[0.3, 0.3, 0.2, 0.1, 0.1, 0.0], mismatch_rate=0.3)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(N_ROWS)]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "web.parquet")
    work = tmp_path_factory.mktemp("work")
    data = cc.embed(None, str(root), BANK, str(work), ["--direct_running_mode=in_memory"])
    return data, {r["uid"]: r for r in rows}


def test_embeddings_are_the_ones_the_build_scored(embedded):
    data, rows = embedded
    assert len(data["uid"]) == N_ROWS and len(data["bank_uid"]) == BANK
    # ground truth joined by uid, not by position
    assert [rows[u]["k"] for u in data["uid"]] == data["k"].tolist()
    assert [rows[u]["mismatched"] for u in data["uid"]] == data["mismatched"].tolist()
    summary = cc.evaluate_all(data, None)
    assert summary["excluded_own"] == BANK  # every bank pair is an input row, left out of its bank
    diffs = summary["checks"]["max_abs_row_diff"]
    # batch_scores on the extracted embeddings and bank == the build's own columns, row for
    # row (a misaligned row or bank would be off by the spread of the scores)
    assert max(diffs.values()) < 1e-5, diffs
    assert summary["checks"]["pipeline_auroc_max_diff"] < 1e-9
    assert set(CERTAINTY_METHODS) - {"clip"} <= set(summary["auroc"])


def test_a_different_check_scores_table_is_reported(embedded, tmp_path):
    data, _ = embedded
    path = tmp_path / "emb.npz"
    np.savez(path, source=np.asarray(json.dumps({"reference": None, "data": "web"})), **data)
    summary = cc.evaluate_all(data, None)
    # check-scores' JSON line as `--compare` prints it, built from the build's own columns
    theirs = check_scores.evaluate(
        {
            "certainty": data["pipeline_certainty"],
            "clip_score": data["pipeline_clip_score"],
            "imbalance": data["pipeline_imbalance"],
            "mismatched": data["mismatched"],
            "k": data["k"],
        },
        {"margin": np.asarray(summary_scores(data)["margin"])},
    )
    theirs["certainty_method"] = "dual_softmax"
    theirs["compare"] = {"margin": 0.0, "dual_softmax": 0.0}
    good = tmp_path / "good.json"
    good.write_text("rows scored: ...\n" + json.dumps(theirs) + "\n")
    out = tmp_path / "out"
    args = ["--embeddings", str(path), "--out", str(out), "--check_scores_json", str(good)]
    assert cc.main(args) == 0
    written = json.loads((out / "summary.json").read_text())["demo"]
    assert written["checks"]["check_scores_auroc_max_diff"] < 1e-9
    assert written["checks"]["check_scores_columns"] == ["clip_score", "dual_softmax", "margin"]
    assert (out / "plot.png").stat().st_size > 0
    assert "| dual_softmax |" in (out / "results.md").read_text()
    # a margin AUROC that differs by 0.01 in one k bucket fails the run
    row = next(r for r in theirs["by_k"] if r["auroc"]["margin"] is not None)
    row["auroc"]["margin"] += 0.01
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(theirs) + "\n")
    args[-1] = str(bad)
    assert cc.main([*args, "--label", "other"]) == 1
    both = json.loads((out / "summary.json").read_text())
    assert set(both) == {"demo", "other"}  # earlier labels are kept
    assert both["other"]["checks"]["check_scores_auroc_max_diff"] == pytest.approx(0.01)
    assert summary["auroc"] == written["auroc"]


def summary_scores(data):
    index = {str(u): i for i, u in enumerate(data["bank_uid"].tolist())}
    exclude = [index.get(str(u)) for u in data["uid"].tolist()]
    return {
        "margin": cc.scores_of(data, exclude, float(data["tau"]), certainty="margin")["certainty"]
    }


def test_delong_aurocs_and_errors():
    rng = np.random.default_rng(0)
    positive = rng.random(300) < 0.7
    a = positive + rng.normal(0, 1.0, 300)
    b = np.round(a + rng.normal(0, 0.5, 300), 1)  # ties
    aucs, cov = cc.delong({"a": a, "b": b}, positive)
    assert aucs["a"] == pytest.approx(roc_auc_score(positive, a))
    assert aucs["b"] == pytest.approx(roc_auc_score(positive, b))
    deltas = cc.paired_deltas({"a": a, "b": b, "a2": a.copy()}, positive, "a")
    assert deltas["a2"] == (0.0, 0.0)  # a score against itself: no difference, no error
    d, se = deltas["b"]
    assert d == pytest.approx(aucs["b"] - aucs["a"]) and 0.0 < se < 0.05
    # the error of one AUROC: between the binomial extremes for these class sizes
    m, n = positive.sum(), (~positive).sum()
    assert np.sqrt(cov[0, 0]) < np.sqrt(0.25 * (1 / m + 1 / n))
