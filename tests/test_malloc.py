"""capgap.core.malloc: large CPU blocks are reused (no fresh pages a batch), the user's
allocator choice is left alone. Each case runs in a child process: the setting is
process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from capgap.core.malloc import user_policy

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# 40 MB blocks allocated, written and freed five times: the minor page faults of the
# last four (the first one may grow the heap).
CHILD = """
import json, resource
from capgap.core.malloc import keep_large_blocks
kept = keep_large_blocks()
size = 40 << 20
def touch():
    block = bytearray(size)
    block[::4096] = b"x" * (size // 4096)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _run_child(**env: str) -> dict:
    full = {k: v for k, v in os.environ.items() if k != "CAPGAP_MALLOC"} | env
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=full, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@glibc
def test_kept_blocks_fault_no_fresh_pages() -> None:
    default = _run_child(CAPGAP_MALLOC="default")
    kept = _run_child()
    glibc_version = tuple(int(v) for v in platform.libc_ver()[1].split(".")[:2])
    if not kept["kept"] and glibc_version < (2, 36):
        pytest.skip(f"glibc {platform.libc_ver()[1]} may refuse a 256 MiB mmap threshold")
    assert default["kept"] is False and kept["kept"] is True
    pages = 4 * (40 << 20) // 4096
    assert default["faults"] > pages // 2  # glibc as it comes: each block is a fresh mmap
    assert kept["faults"] < pages // 20  # kept: the heap hands the same pages back


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"CAPGAP_MALLOC": "default"}, "CAPGAP_MALLOC=default"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD jemalloc"),
        ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, None),
        ({}, None),
    ],
)
def test_user_policy_wins(monkeypatch: pytest.MonkeyPatch, env: dict, reason: str | None) -> None:
    for name in ("CAPGAP_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "GLIBC_TUNABLES", "LD_PRELOAD"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert user_policy() == reason
