"""Run independent training / evaluation jobs side by side in spawned processes.

The demo and the experiments train many small models, each with one torch thread;
two at a time fill a 2-core machine where one leaves a core idle.

    reference, captioner = run_side_by_side([(train_reference, (cfg, data)),
                                             (train_dense_captioner, (cfg, data))], processes=2)
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from capgap.core.console import quiet_third_party_output


def run_side_by_side(jobs: Sequence[tuple[Callable, tuple]], processes: int) -> list[Any]:
    """Run independent ``fn(*args)`` jobs, up to ``processes`` at a time; results in order.

    ``fn`` must be a module-level function and ``args`` picklable. Processes are spawned,
    not forked: forking after torch or Beam started their thread pools can deadlock. The
    first exception (in job order) is re-raised here: jobs not yet started are cancelled,
    the running ones finish.
    """
    if processes < 1:
        raise ValueError("processes must be >= 1")
    if processes == 1 or len(jobs) <= 1:
        return [fn(*args) for fn, args in jobs]
    context = multiprocessing.get_context("spawn")
    workers = min(processes, len(jobs))
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=quiet_third_party_output
    ) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
