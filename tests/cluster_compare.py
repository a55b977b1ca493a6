"""The comparison ``make cluster-check`` makes, for the tests that compare two builds' rows.

``benchmarks/cluster_check.py`` is the one home of ``rows_of`` / ``same_rows`` (floats to
1e-5: RunInference's batch sizes move an embedding by ~1e-7); benchmarks/ is not a package,
so it is loaded here once, by path.

    from cluster_compare import cluster_check
    assert cluster_check.same_rows(a, b)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "cluster_check", Path(__file__).resolve().parents[1] / "benchmarks" / "cluster_check.py"
)
cluster_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cluster_check)
