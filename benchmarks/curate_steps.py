"""Where a steady-state row's time goes inside ``capgap curate``: each step's own time.

Every DoFn of the curate graph (capgap's and Beam's RunInference, batching and file-write
DoFns) is timed around its own code only: a generator step's time is what each ``next()``
on it takes, so the steps downstream of a yield (run by Beam inside the yield) are not
counted twice. A few functions inside the steps are timed too (in brackets: the model's
``embed``, ``decode_record``, ``batch_scores``, the Parquet reads). Two runs in one
process, on ``--n`` rows and ``--scale`` times as many, give each step's us per extra row:
what a large build pays per row, start-up and the bank pass's fixed work left out. A step
a DoFn calls inside its own (DedupDecode's DecodeFn) is listed in brackets, not summed.
The bare batched loop of ``curate_throughput.py`` runs once after, timed the same way, for
its decode and model shares (one run, not paired: for the ratio use that script).

The timers cost ~0.3 us a call; "between the steps" (total minus the steps) holds them,
Beam's per-element work and the garbage collector. Prints a table and one JSON line.

    python benchmarks/curate_steps.py                  # micro CLIP, 3,000 and 30,000 rows
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import functools
import inspect
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import apache_beam as beam  # noqa: E402
import apache_beam.io.iobase as beam_iobase  # noqa: E402
import apache_beam.ml.inference.base as beam_inference  # noqa: E402
import apache_beam.transforms.util as beam_util  # noqa: E402
import curate_throughput as ct  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import capgap.transforms.readers.base as readers_base  # noqa: E402
from capgap.models import clip_handler  # noqa: E402
from capgap.pipeline import curate  # noqa: E402
from capgap.transforms import (  # noqa: E402
    accounting,
    bank,
    decide,
    decode,
    dedup,
    embed,
    score,
    write,
)

SECONDS: dict[str, float] = defaultdict(float)
_DEPTH = [0]  # timed DoFn code running now: a DoFn called by another one counts as inner


def _timed_generator(real, label):
    inner = f"[{label}]"

    @functools.wraps(real)
    def timed(*args, **kwargs):
        key = inner if _DEPTH[0] else label
        _DEPTH[0] += 1
        start = time.perf_counter()
        try:
            steps = real(*args, **kwargs)
            while True:
                try:
                    item = next(steps)
                except StopIteration:
                    return
                SECONDS[key] += time.perf_counter() - start
                _DEPTH[0] -= 1
                try:
                    yield item
                finally:
                    _DEPTH[0] += 1
                    start = time.perf_counter()
        finally:
            SECONDS[key] += time.perf_counter() - start
            _DEPTH[0] -= 1

    return timed


def _timed_call(real, label, consume: bool = False):
    """``real`` timed; ``consume``: its result is an iterable whose work happens as it is
    read (a DoFn's ``process`` that returns rather than yields), read here into a list."""

    @functools.wraps(real)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = real(*args, **kwargs)
        if consume and out is not None:
            out = list(out)
        SECONDS[label] += time.perf_counter() - start
        return out

    return timed


def time_steps() -> None:
    """Wrap every DoFn's ``process`` / ``finish_bundle`` of the curate graph, and the inner
    functions named in the module docstring."""
    modules = (readers_base, dedup, decode, bank, embed, score, decide, write, accounting)
    classes = [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, beam.DoFn)
        and value.__module__ == module.__name__
    ]
    classes += [
        beam_inference._RunInferenceDoFn,
        beam_util._GlobalWindowsBatchingDoFn,
        beam_iobase._WriteBundleDoFn,
    ]
    for cls in classes:
        for name in ("process", "finish_bundle"):
            real = vars(cls).get(name)
            if real is None:
                continue
            label = f"{cls.__name__}.{name}"
            if inspect.isgeneratorfunction(real):
                setattr(cls, name, _timed_generator(real, label))
            else:
                setattr(cls, name, _timed_call(real, label, consume=True))
    inner = [
        (clip_handler.ClipEmbedder, "embed"),
        (decode, "decode_record"),
        (score, "batch_scores"),
        (pq.ParquetFile, "read_row_group"),
        (ct, "pixels"),  # the bare loop's decode
    ]
    for owner, name in inner:
        setattr(owner, name, _timed_call(getattr(owner, name), f"[{name}]"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="capgap-micro-vit")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.device = "cpu"
    import torch

    torch.set_num_threads(args.threads)
    time_steps()
    with tempfile.TemporaryDirectory(prefix="capgap-steps-") as tmp:
        root = Path(tmp)
        n_big = args.n * args.scale
        big = ct.write_split(root / "big", n_big)
        small = ct.write_split(root / "small", args.n)
        ct.pipeline_seconds(small, root / "warm", args, args.n)  # imports, model, caches
        runs = {}
        for label, pattern, n in (("small", small, args.n), ("big", big, n_big)):
            SECONDS.clear()
            wall = ct.pipeline_seconds(pattern, root / label, args, n)
            runs[label] = (wall, dict(SECONDS))
        model_cfg = clip_handler.ClipModelConfig(name=args.model, torch_threads=args.threads)
        embedder = clip_handler.ClipEmbedder(model_cfg)
        reference = ct.reference_bank(embedder, big, curate.CurateConfig().score.bank_size)
        SECONDS.clear()
        bare_start = time.perf_counter()
        ct.bare_loop(embedder, big, args.batch, reference)
        bare_wall, bare = time.perf_counter() - bare_start, dict(SECONDS)
    extra = n_big - args.n
    (small_wall, small_steps), (big_wall, big_steps) = runs["small"], runs["big"]
    per_row = {
        label: (big_steps.get(label, 0.0) - small_steps.get(label, 0.0)) * 1e6 / extra
        for label in big_steps
    }
    per_row = dict(sorted(per_row.items(), key=lambda kv: -kv[1]))
    steady = (big_wall - small_wall) * 1e6 / extra
    bare_per_row = {label: s * 1e6 / n_big for label, s in bare.items()}
    print(f"pipeline, steady: {steady:.0f} us a row; bare loop {bare_wall * 1e6 / n_big:.0f}")
    for label, us in per_row.items():
        if us >= 0.5:
            print(f"  {us:7.1f} us  {label}")
    timed = sum(us for label, us in per_row.items() if not label.startswith("["))
    print(f"  {steady - timed:7.1f} us  between the steps (Beam, the collector, timers)")
    print("bare loop: " + ", ".join(f"{k} {v:.1f} us" for k, v in bare_per_row.items()))
    report = {
        "model": args.model,
        "rows": [args.n, n_big],
        "pipeline_steady_us_per_row": round(steady, 1),
        "bare_us_per_row": round(bare_wall * 1e6 / n_big, 1),
        "steps_us_per_row": {k: round(v, 1) for k, v in per_row.items()},
        "bare_steps_us_per_row": {k: round(v, 1) for k, v in bare_per_row.items()},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
