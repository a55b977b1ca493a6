"""Run independent training / evaluation jobs side by side in spawned processes.

The demo and the experiments train many small models, each with one torch thread;
two at a time fill a 2-core machine where one leaves a core idle.

    reference, captioner = run_side_by_side([(train_reference, (cfg, data)),
                                             (train_dense_captioner, (cfg, data))], processes=2)
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from capgap.core.console import quiet_third_party_output


def run_side_by_side(
    jobs: Sequence[tuple[Callable, tuple]],
    processes: int,
    on_done: Callable[[int], None] | None = None,
) -> list[Any]:
    """Run independent ``fn(*args)`` jobs, up to ``processes`` at a time; results in order.

    ``fn`` must be a module-level function and ``args`` picklable. Processes are spawned,
    not forked: forking after torch or Beam started their thread pools can deadlock. The
    first exception (in job order) is re-raised here: jobs not yet started are cancelled,
    the running ones finish (with ``on_done``: the first in completion order). ``on_done(i)``
    is called here as job ``i`` succeeds (in completion order), e.g. to move a progress bar.
    """
    if processes < 1:
        raise ValueError("processes must be >= 1")
    if processes == 1 or len(jobs) <= 1:
        results = []
        for i, (fn, args) in enumerate(jobs):
            results.append(fn(*args))
            if on_done is not None:
                on_done(i)
        return results
    context = multiprocessing.get_context("spawn")
    workers = min(processes, len(jobs))
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=quiet_third_party_output
    ) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        index = {future: i for i, future in enumerate(futures)}
        try:
            if on_done is not None:
                for future in as_completed(futures):
                    future.result()
                    on_done(index[future])
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
