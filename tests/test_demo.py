"""The quick demo end to end: synth -> reference + captioner -> Beam curate -> students -> eval -> report."""

from __future__ import annotations

import json

import pytest

from capgap.core.config import load_config
from capgap.pipeline import demo


def test_quick_demo_runs_end_to_end(tmp_path):
    cfg = load_config(demo.DemoConfig, "demo_quick", [f"out_dir={tmp_path}"])
    headline = demo.run_demo(cfg)
    counts = headline["curate_counts"]
    assert counts["rows_in"] == counts["curated"] + counts["rejected"] + counts["errors"]
    assert counts["rows_in"] == cfg.synth.splits["web"].n
    # The quantile drop rule removes its share (12% of 600) of the lowest-certainty rows.
    assert 0 < counts["by_reason"]["rejected"]["low_certainty"] <= 0.12 * counts["rows_in"]
    # The reference went through its curriculum, each stage starting from the previous one.
    stage1 = tmp_path / "reference-stage1-objects" / "model.safetensors"
    reference_config = (tmp_path / "reference" / "config.yaml").read_text()
    assert str(stage1) in reference_config and "alttext" in reference_config
    for arm in ("original", "curated"):
        assert isinstance(headline[arm]["l2m"], float)
        assert 0.0 <= headline[arm]["i2t_r@1"] <= 1.0
    saved = json.loads((tmp_path / "headline.json").read_text())
    assert saved["checks"] == headline["checks"]
    assert (tmp_path / "report" / "report.md").is_file()
    assert list((tmp_path / "report").glob("*.png"))
    assert (tmp_path / "config.yaml").is_file()
    # every split written (the captioner's first, the rest in the reference's job)
    for split in cfg.synth.splits:
        assert list((tmp_path / "data" / split).glob("*.parquet")), split
    # each side-by-side job's finish time, within its step's
    steps, jobs = headline["timings_s"], headline["job_timings_s"]
    rounds = {
        "synth the other splits + train reference CLIP | train dense captioner": (
            "reference",
            "captioner",
        ),
        "train students on original and curated web": ("student-original", "student-curated"),
        "evaluate both on test": ("eval-original", "eval-curated"),
    }
    assert set(jobs) == {job for names in rounds.values() for job in names}
    for step, names in rounds.items():
        assert max(jobs[name] for name in names) <= steps[step] + 0.01
        assert min(jobs[name] for name in names) > 0


def test_student_epochs_match_the_budget_to_the_nearest_whole_epoch():
    assert demo.student_epochs(48_000, 6_000) == 8
    assert demo.student_epochs(48_000, 5_281) == 9  # 9.09: not rounded up to 10
    assert demo.student_epochs(48_000, 5_500) == 9  # 8.73: rounded up
    assert demo.student_epochs(100, 1_000) == 1  # never zero epochs


def test_students_start_from_the_named_reference_stage(tmp_path):
    cfg = load_config(demo.DemoConfig, "demo", [f"out_dir={tmp_path}"])
    assert cfg.student_init_stage == 1  # the shipped demo: both students fine-tune it
    assert demo.student_init(cfg) == str(
        tmp_path / "reference-stage1-objects" / "model.safetensors"
    )
    quick = load_config(demo.DemoConfig, "demo_quick", [f"out_dir={tmp_path}"])
    assert demo.student_init(quick) is None  # from scratch
    with pytest.raises(ValueError, match="names no reference_pretrain stage"):
        load_config(demo.DemoConfig, "demo", ["student_init_stage=2"])
    with pytest.raises(ValueError, match="student.model"):
        load_config(demo.DemoConfig, "demo", ["student.model=capgap-micro-vit"])
