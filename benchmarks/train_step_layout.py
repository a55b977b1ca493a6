"""One CLIP training step with and without capgap's two model speed-ups, in one process.

- ``open_clip``: open_clip's own ``CLIP`` (text tower over all context positions,
  contiguous convolutions), the baseline;
- ``trimmed``: :class:`capgap.models.text_trim.TrimmedTextCLIP` (the text tower over the
  positions the batch uses);
- ``trimmed+channels_last``: that, with the ResNet tower in channels-last layout, which is
  what ``create_clip`` builds.

Captions come from the synthetic world in the demo's styles (``objects``: "a star";
``alttext``: 0-5 attributes; ``dense``: all of them). Each variant is timed in alternation,
``--reps`` rounds of ``--steps`` steps after a warm-up; the median step time and the ratio
to ``open_clip`` are printed, with one JSON line at the end.

    python benchmarks/train_step_layout.py                      # micro ResNet, 1 thread
    python benchmarks/train_step_layout.py --model capgap-micro-vit
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import open_clip
import torch

from capgap.models.clip_factory import create_clip
from capgap.models.losses import build_loss
from capgap.models.optim import make_adamw
from capgap.pipeline import synth

STYLES = {  # synth split k weights: how many attributes a caption names
    "objects": [1, 0, 0, 0, 0, 0],
    "alttext": [1, 1, 1, 1, 1, 1],
    "dense": [0, 0, 0, 0, 0, 1],
}


def captions(style: str, n: int) -> list[str]:
    split = synth.SplitConfig(n=n, k_weights=STYLES[style], mismatch_rate=0.0)
    return [synth.make_row(i, style, split, 0, 32, 0.05)["caption"] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="capgap-micro-rn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, tokenizer = create_clip(args.model)
    model.output_dict = True
    trimmed_cls = type(model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(args.batch, 3, size, size)
    loss_fn = build_loss("clip")
    optimizer = make_adamw(model, 1e-4, 0.1)
    variants = {
        "open_clip": (open_clip.CLIP, torch.contiguous_format),
        "trimmed": (trimmed_cls, torch.contiguous_format),
        "trimmed+channels_last": (trimmed_cls, torch.channels_last),
    }

    def steps(tokens: torch.Tensor, variant: str, n: int) -> float:
        cls, layout = variants[variant]
        model.__class__ = cls
        model.visual.to(memory_format=layout)
        start = time.perf_counter()
        for _ in range(n):
            feats = model(images, tokens)
            loss = loss_fn(feats["image_features"], feats["text_features"], feats["logit_scale"])
            optimizer.zero_grad(set_to_none=True)
            loss["loss"].backward()
            optimizer.step()
        return (time.perf_counter() - start) / n * 1e3

    result: dict[str, dict[str, float]] = {}
    for style in STYLES:
        tokens = tokenizer(captions(style, args.batch))
        used = int(tokens.argmax(dim=-1).max()) + 1
        times: dict[str, list[float]] = {v: [] for v in variants}
        for variant in variants:
            steps(tokens, variant, 1)  # warm-up
        for _ in range(args.reps):
            for variant in variants:
                times[variant].append(steps(tokens, variant, args.steps))
        med = {v: statistics.median(t) for v, t in times.items()}
        result[style] = {f"{v}_ms": round(m, 1) for v, m in med.items()}
        line = ", ".join(f"{v} {m:.0f} ms ({med['open_clip'] / m:.2f}x)" for v, m in med.items())
        print(f"{style:8s} ({used}/{tokens.shape[1]} positions): {line}")
    model.__class__ = trimmed_cls
    print(json.dumps({"model": args.model, "batch": args.batch, **result}))


if __name__ == "__main__":
    main()
