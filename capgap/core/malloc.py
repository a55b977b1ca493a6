"""glibc malloc settings for processes that run models on the CPU: large blocks stay for reuse.

glibc serves a request above its mmap threshold (128 KiB, raised on the fly to at most
32 MiB) with a fresh ``mmap`` and unmaps it again on ``free``. A CPU forward pass allocates
and frees activation tensors bigger than that in every layer (ViT-B/32's image MLP at batch
64: 64 x 50 x 3072 floats, 39 MB), so each comes back as new pages the kernel faults in
and zeroes: on a 2-core VM ``x * sigmoid(1.702 * x)`` over such a tensor took 40 ms, 9 ms
once the blocks were reused; a transformers ViT-B/32's two towers ran 1.12x faster
(``benchmarks/malloc_reuse.py``) and ``capgap curate`` on 1,024 pairs 2-5% (README). :func:`keep_large_blocks` raises the mmap threshold so
those blocks come from the heap, and the trim threshold above it so the freed top of the
heap is not handed back at once; the next batch reuses the same memory. The price is
resident memory: up to ``trim_threshold`` of freed heap may stay mapped.

It is a process-wide setting, so the callers are the process entry points: the ``capgap``
command (``pipeline/cli.py``), the job workers it spawns (``pipeline/jobs.py``), and the
model handlers' ``load_model`` (workers of a remote runner never run the CLI). The
settings are left as they are where the user chose an allocator policy: another allocator
preloaded (jemalloc, tcmalloc), glibc's own ``MALLOC_*_THRESHOLD_`` / ``GLIBC_TUNABLES``
malloc settings, or ``CAPGAP_MALLOC=default``; and where the C library is not glibc.

    keep_large_blocks()        # True when the thresholds were set, False when left alone
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20

_USER_POLICY_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def user_policy() -> str | None:
    """Why the allocator is the user's choice (a short reason), or None when it is glibc's
    default and capgap may set it."""
    env = os.environ
    if env.get("CAPGAP_MALLOC", "").strip().lower() == "default":
        return "CAPGAP_MALLOC=default"
    for name in _USER_POLICY_ENV:
        if name in env:
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = env.get("LD_PRELOAD", "")
    for allocator in _PRELOADED_ALLOCATORS:
        if allocator in preload:
            return f"LD_PRELOAD {allocator}"
    return None


def keep_large_blocks(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).
    Returns whether they were set: False off Linux glibc or where :func:`user_policy` finds
    the user's own choice. Calling it again is harmless."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if user_policy() is not None:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success. Some glibc versions refuse an mmap threshold over half
    # their heap size (32 MiB); then nothing is changed.
    if not libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
