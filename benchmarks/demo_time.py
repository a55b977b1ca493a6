"""Time ``capgap demo`` end to end against its 10-minute budget on a 2-core CPU.

    .venv/bin/python benchmarks/demo_time.py [--quick] [--out_dir /tmp/demo_bench]

Prints each step's wall time (from the demo's own timer), the total, and the ratio
to the budget (600 s for the full demo, 180 s for --quick); exits non-zero when over.
"""

from __future__ import annotations

import argparse
import time

from capgap.core.config import load_config
from capgap.core.console import quiet_third_party_output


def main() -> None:
    # As `capgap demo` does: before Beam is first imported (here and in the demo's workers,
    # which import this module again), so its apitools line is dropped.
    quiet_third_party_output()
    from capgap.pipeline import demo

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out_dir", default="/tmp/capgap_demo_bench")
    args = parser.parse_args()
    preset, budget = ("demo_quick", 180.0) if args.quick else ("demo", 600.0)
    cfg = load_config(demo.DemoConfig, preset, [f"out_dir={args.out_dir}"])
    start = time.perf_counter()
    headline = demo.run_demo(cfg)
    total = time.perf_counter() - start
    for step, seconds in headline["timings_s"].items():
        print(f"{seconds:8.1f}s  {step}")
    print(
        f"demo ({preset}) total: {total:.0f}s; ratio to the {budget:.0f}s budget: {total / budget:.2f}"
    )
    if total > budget:
        raise SystemExit("over budget")


if __name__ == "__main__":
    main()
