"""The collector thresholds capgap sets while a pipeline runs (capgap/core/collector.py).

.venv/bin/python -m pytest -q tests/test_collector.py
"""

from __future__ import annotations

import gc

import pytest

from capgap.core.collector import THRESHOLDS, fewer_collections


@pytest.fixture(autouse=True)
def caller_thresholds(monkeypatch):
    monkeypatch.delenv("CAPGAP_GC", raising=False)
    before = gc.get_threshold()
    gc.set_threshold(900, 11, 12)  # not CPython's default, so a reset would show
    yield
    gc.set_threshold(*before)


def test_raised_inside_and_restored_after():
    with fewer_collections() as changed:
        assert changed and gc.get_threshold() == THRESHOLDS
    assert gc.get_threshold() == (900, 11, 12)


def test_restored_when_the_block_raises():
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("a failed run")
    assert gc.get_threshold() == (900, 11, 12)


def test_left_alone_when_the_user_says_so_or_the_collector_is_off(monkeypatch):
    monkeypatch.setenv("CAPGAP_GC", "default")
    with fewer_collections() as changed:
        assert not changed and gc.get_threshold() == (900, 11, 12)
    monkeypatch.delenv("CAPGAP_GC")
    gc.disable()
    try:
        with fewer_collections() as changed:
            assert not changed and gc.get_threshold() == (900, 11, 12)
    finally:
        gc.enable()


SEEN: list[tuple] = []  # module level: Beam pickles the step, which finds it by reference


def _record_thresholds(_) -> None:
    SEEN.append(gc.get_threshold())


def test_a_curate_run_raises_them_while_it_runs(monkeypatch, tmp_path):
    """run_config wraps the run: a step sees the raised thresholds, the caller its own after."""
    import apache_beam as beam

    from capgap.pipeline import curate

    SEEN.clear()

    def planned(cfg, options, test_pipeline):
        p = beam.Pipeline()
        _ = p | beam.Create([0]) | beam.Map(_record_thresholds)
        return p

    monkeypatch.setattr(curate, "planned_pipeline", planned)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / curate.MANIFEST).write_text("{}")
    curate.run_config(curate.CurateConfig(input="unused", output=str(tmp_path / "out")))
    assert SEEN == [THRESHOLDS] and gc.get_threshold() == (900, 11, 12)
