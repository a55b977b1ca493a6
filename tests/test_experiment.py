"""``capgap experiment``: arm bookkeeping, a tiny end-to-end run, reuse of finished runs."""

from __future__ import annotations

import json

import pytest

from capgap.pipeline import experiment


def test_arm_means_by_hand():
    rows = [
        {"arm": "k0", "value": 0, "seed": 0, "l2m": 1.0},
        {"arm": "k0", "value": 0, "seed": 1, "l2m": 0.5},
        {"arm": "k5", "value": 5, "seed": 0, "l2m": 0.2},
        {"arm": "k5", "value": 5, "seed": 1, "l2m": None},  # a metric a run could not compute
    ]
    table = experiment.arm_means(rows, ["l2m"])
    assert [e["arm"] for e in table] == ["k0", "k5"]
    assert table[0]["l2m"] == pytest.approx(0.75) and table[0]["l2m_std"] == pytest.approx(0.25)
    assert table[1]["l2m"] == pytest.approx(0.2) and table[1]["n_seeds"] == 2


def test_default_model_learns_objects_config():
    cfg = experiment.ExperimentConfig()
    assert cfg.train.model == "capgap-micro-rn" and cfg.seeds == [0, 1, 2]


def tiny_config(tmp_path, **overrides):
    train = experiment.replace(
        experiment._default_train(), model="capgap-micro-vit", epochs=1, batch_size=32
    )
    cfg = experiment.ExperimentConfig(
        out_dir=str(tmp_path), seeds=[0], n_train=64, n_test=48, ks=[0, 5], train=train,
        parallel=1,
    )  # fmt: skip
    cfg.eval.max_samples = 48
    cfg.eval.robustness.sigmas = [0.3]
    cfg.eval.robustness.n_trials = 1
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_info_imbalance_end_to_end_and_reuse(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, parallel=2)  # the two arms train side by side
    summary = experiment.info_imbalance(cfg)
    root = tmp_path / "info-imbalance"
    for name in ("results.csv", "results.md", "summary.json", "plot.png", "config.yaml"):
        assert (root / name).is_file(), name
    assert json.loads((root / "summary.json").read_text()) == summary
    # two arms: Spearman is the sign of the difference
    assert abs(summary["spearman_k_l2m"]) == pytest.approx(1.0)
    rows = (root / "results.csv").read_text().splitlines()
    assert rows[0].startswith("arm,value,seed,l2m") and len(rows) == 3

    # a second call with the same config reuses every finished run (no training)
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiment, "train", no_training)
    cfg.parallel = 1  # in this process, where the patch applies
    assert experiment.info_imbalance(cfg) == summary


def test_mean_shift_reports_both_protocols(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    summary = experiment.mean_shift(cfg)
    for key in ("clean_acc_before", "l2m_before"):
        assert isinstance(summary[key], float)
    for protocol in ("fit_on_held_out", "fit_on_test"):
        part = summary[protocol]
        assert [p["sigma"] for p in part["per_sigma"]] == [0.3]
        assert isinstance(part["clean_acc_after"], float) and isinstance(part["l2m_after"], float)
        assert isinstance(part["claim_lower_flip_in_range"], bool)
    assert summary["fit_on_held_out"]["l2m_after"] != summary["fit_on_test"]["l2m_after"]
    eval_config = tmp_path / "mean-shift" / "runs" / "web-s0" / "eval_config.yaml"
    assert "mean-shift-fit" in eval_config.read_text()  # the held-out split was the fit set

    # a changed eval config re-evaluates the finished run without training it again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiment, "train", no_training)
    cfg.eval.robustness.n_trials = 2
    assert experiment.mean_shift(cfg)["fit_on_test"]["per_sigma"][0]["sigma"] == 0.3


def test_cli_rejects_unknown_key():
    with pytest.raises(SystemExit):
        experiment.main(["info-imbalance", "--set", "no_such_key=1"])
