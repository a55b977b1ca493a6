"""``capgap check-scores``: AUROC per k, its table, and the --compare alignment (no model).

.venv/bin/python -m pytest -q tests/test_check_scores.py
"""

from __future__ import annotations

import numpy as np
import pytest

from capgap.pipeline import check_scores
from capgap.pipeline.check_scores import (
    N_ATTRIBUTES,
    CheckScoresConfig,
    auroc_by_k,
    evaluate,
    format_by_k,
)
from capgap.transforms.score import CERTAINTY_METHODS

# Ten rows: k = 0 (4 rows, 1 mismatched), k = 1 (4 rows, 1 mismatched), k = 2 (2, none).
K = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
MISMATCHED = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
# a: the k = 0 mismatch is lowest (AUROC 1), the k = 1 one highest (0); over all rows the
# matched beat 0.1 (8 of 8) and never 0.9 (0 of 8): 8 / 16.
A = np.array([0.1, 0.5, 0.6, 0.7, 0.9, 0.2, 0.3, 0.4, 0.8, 0.8])
# b: a tie at k = 0 counts half: (0.5 + 1 + 1) / 3; k = 1: beats 2 of 3 matched.
B = np.array([0.5, 0.5, 0.6, 0.7, 0.35, 0.2, 0.3, 0.4, 0.8, 0.8])


def test_auroc_by_k_on_known_values():
    table = auroc_by_k(K, MISMATCHED, {"a": A, "b": B})
    assert [row["k"] for row in table] == [*range(N_ATTRIBUTES + 1), "all"]
    by = {row["k"]: row for row in table}
    assert (by[0]["n"], by[0]["mismatched"]) == (4, 1)
    assert (by[2]["n"], by[2]["mismatched"]) == (2, 0)
    assert (by["all"]["n"], by["all"]["mismatched"]) == (10, 2)
    assert by[0]["auroc"]["a"] == pytest.approx(1.0)
    assert by[1]["auroc"]["a"] == pytest.approx(0.0)
    assert by["all"]["auroc"]["a"] == pytest.approx(0.5)
    assert by[0]["auroc"]["b"] == pytest.approx(2.5 / 3)
    assert by[1]["auroc"]["b"] == pytest.approx(1 / 3)
    # no mismatched row (k = 2) or no row at all (k = 3 ..): no AUROC
    assert by[2]["auroc"] == {"a": None, "b": None}
    assert by[N_ATTRIBUTES]["n"] == 0 and by[N_ATTRIBUTES]["auroc"]["a"] is None
    # the "all" row is the plain AUROC
    assert by["all"]["auroc"]["b"] == pytest.approx(check_scores.auroc(B, ~MISMATCHED))


def test_format_by_k_is_one_aligned_line_per_row():
    table = auroc_by_k(K, MISMATCHED, {"certainty": A, "clip_score": B})
    text = format_by_k(table, {"certainty": "certainty(dual_softmax)"})
    lines = text.splitlines()
    assert len(lines) == 1 + N_ATTRIBUTES + 2
    assert lines[0].split() == ["k", "n", "mismatched", "certainty(dual_softmax)", "clip_score"]
    assert lines[1].split() == ["0", "4", "1", "1.0000", "0.8333"]
    assert lines[3].split() == ["2", "2", "0", "-", "-"]
    # b over all rows: the matched beat 0.5 in 4 (tie 1) and 0.35 in 6: 10.5 / 16
    assert lines[-1].split() == ["all", "10", "2", "0.5000", "0.6562"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns


def _scored(order=None, certainty=A):
    order = np.arange(len(K)) if order is None else np.asarray(order)
    return {
        "uid": np.array([f"u{i}" for i in range(len(K))])[order],
        "clip_score": B[order],
        "certainty": certainty[order],
        "imbalance": np.linspace(1, 0, len(K))[order],
        "mismatched": MISMATCHED[order],
        "k": K[order],
    }


def test_evaluate_adds_the_table_with_certainty_clip_score_and_others():
    results = evaluate(_scored(), {"rank": B})
    overall = results["by_k"][-1]
    assert overall["k"] == "all"
    assert overall["auroc"]["certainty"] == pytest.approx(results["certainty_auroc"])
    assert overall["auroc"]["clip_score"] == pytest.approx(results["clip_score_auroc"])
    assert list(overall["auroc"]) == ["certainty", "clip_score", "rank"]


def test_compare_reruns_curate_per_other_option_and_aligns_by_uid(monkeypatch):
    runs = []

    def fake_run(cfg, out, extra=()):
        runs.append(list(extra))

    shuffled = [3, 9, 0, 5, 1, 8, 2, 7, 4, 6]
    monkeypatch.setattr(check_scores, "run_curate", fake_run)
    # every run returns its rows in another order, certainty = B
    monkeypatch.setattr(check_scores, "read_scored", lambda out: _scored(shuffled, B))
    cfg = CheckScoresConfig(reference="ref", compare=True)
    others = check_scores.compare_certainty(cfg, _scored()["uid"], "dual_softmax")
    assert runs == [[f"score.certainty={m}"] for m in CERTAINTY_METHODS if m != "dual_softmax"]
    assert list(others) == [m for m in CERTAINTY_METHODS if m != "dual_softmax"]
    for values in others.values():
        np.testing.assert_array_equal(values, B)  # back in the caller's row order
    with pytest.raises(check_scores.ConfigError):
        check_scores.compare_certainty(CheckScoresConfig(compare=True), _scored()["uid"], None)
