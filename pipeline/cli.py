"""The ``capgap`` console command: one subcommand per pipeline stage.

Each subcommand lives in its own module under ``capgap.pipeline`` with a
``main(argv)`` that owns its flags, so ``capgap train --help`` shows exactly
what ``train`` takes. Modules are imported only when their command runs, so
``capgap synth`` does not pay for importing Beam or torch.

    capgap --help
    capgap synth --out data/synth
    capgap curate --config configs/demo.yaml --input 'data/synth/web/*.parquet'
"""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Sequence

from capgap.core.console import quiet_third_party_output
from capgap.core.malloc import keep_large_blocks

# command -> (module under capgap.pipeline, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("synth", "write the synthetic world's seed / web / test splits as Parquet"),
    "curate": ("curate", "Beam pipeline: score, drop, recaption and write curated shards"),
    "cache": ("cache", "a curate cache: stats per model, prune unused or old entries"),
    "train": ("train", "train or fine-tune a CLIP model on Parquet shards"),
    "eval": ("evaluate", "measure gap, retrieval, zero-shot and robustness of a checkpoint"),
    "report": ("report", "compare runs side by side: Markdown table + PNG plots"),
    "train-captioner": ("train_captioner", "train the embedded dense captioner on seed"),
    "check-scores": ("check_scores", "validate certainty / imbalance scores on ground truth"),
    "demo": ("demo", "the whole loop on the synthetic world, offline, on CPU"),
    "experiment": ("experiment", "reproduce a paper's claim on the synthetic world"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: capgap COMMAND [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from capgap import __version__

        print(f"capgap {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"capgap: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_third_party_output()
    keep_large_blocks()  # before any model runs: CPU tensors reuse their blocks
    module = importlib.import_module(f"capgap.pipeline.{COMMANDS[name][0]}")
    return int(module.main(rest) or 0)


def entry() -> None:
    """The ``capgap`` console script: :func:`main`, then exit. The objects alive at that point
    (torch's, transformers', Beam's: millions) are frozen first, so the interpreter's
    shutdown collections skip them: exit took ~1.6 s of a ``capgap curate`` here, ~0.3 s
    frozen. Their memory goes back to the OS with the process; atexit handlers, the std
    streams' flush and module teardown run as always."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
