"""`capgap report`: Markdown with a side-by-side table and PNG plots from saved eval outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from capgap.models import metrics
from capgap.pipeline import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(folder, gap: float, seed: int, with_embeddings: bool = True, with_log: bool = True):
    """A run folder as `capgap train` + `capgap eval` leave it, with a gap of size ``gap``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    content = rng.normal(size=(60, 15))
    img = metrics.l2_normalize(np.concatenate([np.full((60, 1), gap), content], axis=1))
    txt = metrics.l2_normalize(np.concatenate([np.full((60, 1), -gap), content], axis=1))
    sigmas = [0.1, 0.3]
    result = {
        "run_dir": str(folder),
        "data": "data/synth/test/*.parquet",
        "model": "capgap-micro-vit",
        "n_pairs": 60,
        "l2m": metrics.l2m(img, txt),
        "rmg": metrics.rmg(img, txt),
        "robustness_sigmas": sigmas,
        "skipped": [],
    }
    for s in sigmas:
        result[f"zs_mean_flip_noise{s:g}"] = 0.2 * s * (1 + gap)
        result[f"shift_zs_mean_flip_noise{s:g}"] = 0.2 * s
        result[f"i2t_flip_noise{s:g}"] = 0.3 * s
    if with_embeddings:
        np.savez(folder / "embeddings.npz", img=img, txt=txt)
        result["embeddings"] = "embeddings.npz"
    (folder / "eval.json").write_text(json.dumps(result))
    if with_log:
        rows = [{"kind": "step", "step": i, "loss": 4.0 / (1 + i), "lr": 1e-3} for i in range(30)]
        rows.append({"kind": "epoch", "step": 29, "loss": 0.5, "epoch_only": 1.0})
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_report_markdown_and_plots(tmp_path):
    a = _fake_run(tmp_path / "runs" / "original", gap=2.0, seed=0)
    b = _fake_run(tmp_path / "runs" / "curated", gap=0.2, seed=1)
    out = tmp_path / "report"
    md_path = report.make_report([a, b / "eval.json"], report.ReportConfig(out=str(out)))
    md = md_path.read_text()
    assert "| metric | original | curated |" in md
    l2m_row = next(line for line in md.splitlines() if line.startswith("| l2m |"))
    ja, jb = (json.loads((r / "eval.json").read_text()) for r in (a, b))
    assert f"{ja['l2m']:.4f}" in l2m_row and f"{jb['l2m']:.4f}" in l2m_row
    assert "| zs_acc_object | - | - |" in md  # absent metrics show as "-"
    assert "0.3 |" in md and "->" in md  # the flip-rate table, before -> after
    for name in ("pca.png", "flip_vs_sigma.png", "gap_dims.png", "training_curves.png"):
        assert f"]({name})" in md
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert (out / "report_config.yaml").is_file()
    # curves come from the per-step rows only; epoch summaries are not mixed in
    runs = [report.load_run(a, "a")]
    assert report.curve_keys(runs) == ["loss", "lr"]


def test_report_without_embeddings_or_log(tmp_path, capsys):
    a = _fake_run(tmp_path / "x" / "run", gap=1.0, seed=0, with_embeddings=False, with_log=False)
    b = _fake_run(tmp_path / "y" / "run", gap=0.5, seed=1, with_embeddings=False, with_log=False)
    out = tmp_path / "rep"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| metric | x/run | y/run |" in md  # clashing folder names made unique
    assert "no data" in md and not (out / "pca.png").exists()
    assert (out / "flip_vs_sigma.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_report_names_and_errors(tmp_path):
    a = _fake_run(tmp_path / "a", gap=1.0, seed=0)
    cfg = report.ReportConfig(out=str(tmp_path / "r"), names=["one", "two"])
    with pytest.raises(ValueError, match="names"):
        report.make_report([a], cfg)
    with pytest.raises(FileNotFoundError, match="eval.json"):
        report.make_report([tmp_path / "missing"], report.ReportConfig(out=str(tmp_path / "r")))
    (a / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        report.make_report([a], report.ReportConfig(out=str(tmp_path / "r")))
