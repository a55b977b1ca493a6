"""``run_side_by_side``: results in job order, in processes or inline, errors re-raised."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from capgap.pipeline.jobs import JobPool, run_side_by_side


def test_results_come_back_in_job_order_from_other_processes():
    jobs = [(math.pow, (2, k)) for k in range(5)]
    assert run_side_by_side(jobs, processes=2) == [1.0, 2.0, 4.0, 8.0, 16.0]
    pids = run_side_by_side([(os.getpid, ()), (os.getpid, ())], processes=2)
    assert os.getpid() not in pids


def test_on_done_hears_of_every_job_once_in_processes_and_inline():
    for processes in (1, 2):
        done: list[int] = []
        jobs = [(math.pow, (2, k)) for k in range(4)]
        assert run_side_by_side(jobs, processes, on_done=done.append) == [1.0, 2.0, 4.0, 8.0]
        assert sorted(done) == [0, 1, 2, 3]


def test_one_process_runs_inline():
    assert run_side_by_side([(os.getpid, ())], processes=1) == [os.getpid()]
    with pytest.raises(ValueError, match="processes"):
        run_side_by_side([(os.getpid, ())], processes=0)


def _sleep_then_touch(path: str) -> None:
    time.sleep(0.2)
    Path(path).touch()


def test_a_failing_job_raises_its_error_and_cancels_the_queued_ones(tmp_path):
    with pytest.raises(ValueError, match="math domain error"):
        run_side_by_side([(math.sqrt, (4,)), (math.sqrt, (-1,))], processes=2)
    jobs = [(math.sqrt, (-1,))]
    jobs += [(_sleep_then_touch, (str(tmp_path / f"{i}.done"),)) for i in range(20)]
    with pytest.raises(ValueError, match="math domain error"):
        run_side_by_side(jobs, processes=2)
    # only the few jobs already handed to a worker ran; without cancelling, all 20 would
    assert len(list(tmp_path.glob("*.done"))) < 10


def test_a_pool_keeps_its_workers_across_rounds_and_cancels_after_a_failure(tmp_path):
    with JobPool(2) as pool:
        first = set(pool.run([(os.getpid, ()), (os.getpid, ())]))
        second = set(pool.run([(os.getpid, ()), (os.getpid, ())]))
        assert os.getpid() not in first | second
        assert len(first | second) <= 2  # the same two workers, not two new ones a round
        assert run_side_by_side([(math.pow, (2, k)) for k in range(3)], 2, pool=pool) == [1, 2, 4]
        jobs = [(math.sqrt, (-1,))]
        jobs += [(_sleep_then_touch, (str(tmp_path / f"{i}.done"),)) for i in range(20)]
        with pytest.raises(ValueError, match="math domain error"):
            pool.run(jobs)
        assert len(list(tmp_path.glob("*.done"))) < 10
        assert pool.run([(math.pow, (3, 2)), (math.pow, (2, 3))]) == [9.0, 8.0]  # still usable
        pool.close(wait=False)
        assert pool.run([(math.pow, (2, 2)), (math.pow, (2, 0))]) == [4.0, 1.0]  # new workers
    with pytest.raises(ValueError, match="processes"):
        JobPool(0)


def _loaded(name: str) -> bool:
    import sys

    return name in sys.modules


def test_warm_imports_a_module_in_every_worker_before_the_next_round():
    with JobPool(2) as pool:
        assert pool.run([(_loaded, ("email.mime.text",))] * 4) == [False] * 4
        pool.warm(["email.mime.text"])
        # every worker, not one worker twice: each waits for the other at the pool's barrier
        assert pool.run([(_loaded, ("email.mime.text",))] * 6) == [True] * 6
        pool.warm(["no_such_module_anywhere"])
        with pytest.raises(ModuleNotFoundError):
            pool.run([(os.getpid, ())])
    inline = JobPool(1)
    inline.warm(["no_such_module_anywhere"])  # inline: nothing to warm
    assert inline.run([(os.getpid, ())]) == [os.getpid()]
