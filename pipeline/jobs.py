"""Run independent training / evaluation jobs side by side in spawned processes.

The demo and the experiments train many small models, each with one torch thread;
two at a time fill a 2-core machine where one leaves a core idle.

    reference, captioner = run_side_by_side([(train_reference, (cfg, data)),
                                             (train_captioner, (captioner_cfg,))], processes=2)
    with JobPool(2) as pool:   # workers started once for several rounds
        first = pool.run(jobs)
        pool.warm(["capgap.pipeline.train"])   # imports on every worker, in the background
        second = pool.run(more_jobs)
"""

from __future__ import annotations

import importlib
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures import wait as wait_for
from typing import Any

from capgap.core.console import quiet_third_party_output
from capgap.core.malloc import keep_large_blocks

# Set in each worker by _start_worker: the pool's barrier, which makes every worker take
# exactly one of the jobs JobPool.warm hands out.
_BARRIER: Any = None


def _start_worker(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier
    quiet_third_party_output()
    keep_large_blocks()


def _import_then_wait(modules: Sequence[str], timeout_s: float) -> None:
    try:
        for name in modules:
            importlib.import_module(name)
    finally:  # a failed import still lets the other workers through
        _BARRIER.wait(timeout_s)


class JobPool:
    """Up to ``processes`` spawned worker processes, kept for several rounds of jobs.

    A spawned worker imports what its jobs need (torch, open_clip, Beam: ~13 s on a 2-core
    VM) once, not once a round as a pool per :func:`run_side_by_side` call would. Workers
    keep their module state between jobs, so a job sets what it relies on (torch threads,
    seeds) itself, as capgap's training and evaluation jobs do. ``processes == 1`` runs
    jobs inline.

        with JobPool(2) as pool:
            data = synth.run(synth_cfg, pool=pool)
            reference, captioner = pool.run([(train_reference, ...), (train_captioner, ...)])
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.processes = processes
        self._executor: ProcessPoolExecutor | None = None
        self._warming: list[Future] = []

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, wait: bool = True) -> None:
        """Stop the workers; ``wait=False`` lets them exit in the background (their
        teardown, ~3 s for a worker that imported torch, then overlaps the caller's work).
        A later :meth:`run` starts new ones."""
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None
            self._warming = []

    def warm(self, modules: Sequence[str], timeout_s: float = 120.0) -> None:
        """Import ``modules`` in every worker, without waiting: the imports run while the
        caller does other work, e.g. on workers idle between rounds, so that the next round's
        jobs find them loaded (a worker imports a job's module on its first job from it:
        ``capgap.pipeline.demo`` takes ~9 s on a 2-core VM). The next :meth:`run` waits for
        them. No-op inline (``processes == 1``)."""
        if self.processes == 1:
            return
        executor = self._start()
        self._warming = [
            executor.submit(_import_then_wait, list(modules), timeout_s)
            for _ in range(self.processes)
        ]

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=context,
                initializer=_start_worker,
                initargs=(context.Barrier(self.processes),),
            )
        return self._executor

    def run(
        self, jobs: Sequence[tuple[Callable, tuple]], on_done: Callable[[int], None] | None = None
    ) -> list[Any]:
        """:func:`run_side_by_side` on this pool's workers (started on first use)."""
        warming, self._warming = self._warming, []
        for future in warming:
            future.result()  # an import error of warm() surfaces here, before any job runs
        if self.processes == 1 or len(jobs) <= 1:
            results = []
            for i, (fn, args) in enumerate(jobs):
                results.append(fn(*args))
                if on_done is not None:
                    on_done(i)
            return results
        executor = self._start()
        futures = [executor.submit(fn, *args) for fn, args in jobs]
        index = {future: i for i, future in enumerate(futures)}
        try:
            if on_done is not None:
                for future in as_completed(futures):
                    future.result()
                    on_done(index[future])
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:  # queued jobs never start; running ones finish
                future.cancel()
            wait_for(futures)
            raise


def run_side_by_side(
    jobs: Sequence[tuple[Callable, tuple]],
    processes: int,
    on_done: Callable[[int], None] | None = None,
    pool: JobPool | None = None,
) -> list[Any]:
    """Run independent ``fn(*args)`` jobs, up to ``processes`` at a time; results in order.

    ``fn`` must be a module-level function and ``args`` picklable. Processes are spawned,
    not forked: forking after torch or Beam started their thread pools can deadlock. The
    first exception (in job order) is re-raised here: jobs not yet started are cancelled,
    the running ones finish (with ``on_done``: the first in completion order). ``on_done(i)``
    is called here as job ``i`` succeeds (in completion order), e.g. to move a progress bar.
    ``pool``: run on that :class:`JobPool`'s workers (``processes`` is then its size)
    instead of a pool of ``processes`` started and stopped for this call.
    """
    if pool is not None:
        return pool.run(jobs, on_done)
    with JobPool(processes) as own:
        return own.run(jobs, on_done)
