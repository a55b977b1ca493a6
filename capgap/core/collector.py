"""Python's cyclic garbage collector, run less often while a pipeline runs in this process.

With CPython's default thresholds (700, 10, 10) a young collection runs every 700 container
allocations and a full one, which walks every tracked object, whenever enough young
objects survived. A Beam pass allocates some twenty containers a row and keeps ~570,000
long-lived objects (Beam, torch, transformers, the pipeline graph), so on the micro model's
steady rows (~700 us each) the collector took 0.6-0.9 s of a 3,000 + 30,000-row pair of
``capgap curate`` runs, most of it in one or two full collections of 0.3-0.4 s each
(``gc.callbacks`` timing, 2026-12-04). :func:`fewer_collections` raises the young threshold to
20,000 and the older generations' to 50 and 100 for the duration of a run: 22 young
collections and no older one in the same pair of runs, 0.11 s in all. Garbage without
cycles is freed at once by reference counting either way; cyclic garbage waits longer.

``CAPGAP_GC=default`` leaves the thresholds as they are, as does a collector the caller
disabled (``gc.disable()``).

    with fewer_collections():
        result = pipeline.run()
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

THRESHOLDS = (20_000, 50, 100)


@contextmanager
def fewer_collections() -> Iterator[bool]:
    """Collector thresholds at :data:`THRESHOLDS` inside the block, the caller's after it.
    Yields whether they were changed (not under ``CAPGAP_GC=default`` or a disabled
    collector)."""
    if os.environ.get("CAPGAP_GC", "").strip().lower() == "default" or not gc.isenabled():
        yield False
        return
    before = gc.get_threshold()
    gc.set_threshold(*THRESHOLDS)
    try:
        yield True
    finally:
        gc.set_threshold(*before)
