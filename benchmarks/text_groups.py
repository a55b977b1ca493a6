"""The text tower over a batch in groups of similar caption length, against one pass per batch.

Three ways to run the same batches (``--batch`` captions each) through the same random-init
text tower (``--model``: an open_clip name, default ViT-B-32; or ``--hf``, a transformers
CLIP of ViT-B/32's size written to a temporary folder):

- ``padded``: every position the tokenizer gives (77 for ViT-B/32): what open_clip's
  ``encode_text`` and a plain transformers forward do;
- ``one pass``: the batch cut after its longest caption (capgap before length groups);
- ``groups``: capgap's ``encode_text`` (``capgap.models.text_groups``: groups of similar
  length, each cut after its longest).

on two caption sets of ``--n`` captions each:

- ``synthetic``: the captions of synth's ``web`` split (``capgap.pipeline.synth``, the
  peers' input: 4-16 tokens);
- ``long tail``: the same, but every 10th caption is five of them joined by commas (a dense
  description, ~30-60 tokens) and every 50th runs past the context (cut at 77): the tail
  web alt-text and recaptioned data have.

Runs alternate per rep (padded, one pass, groups) so drift hits all alike; the best of
``--reps`` is reported. The largest feature difference to ``padded`` is printed too (the
groups change no feature beyond float rounding). Prints one JSON line at the end.

    python benchmarks/text_groups.py                   # open_clip ViT-B-32, CPU, 2 threads
    python benchmarks/text_groups.py --hf --batch 64
    python benchmarks/text_groups.py --backward --n 256     # a training step's text tower
    python benchmarks/text_groups.py --device cuda --batch 1024 --n 8192 --threads 0
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()

import argparse
import itertools
import json
import tempfile
import time

import numpy as np
import torch

from capgap.models.clip_factory import create_clip
from capgap.models.hf_clip import build_random_hf_clip, load_hf_clip
from capgap.pipeline import synth


def captions(n: int, long_tail: bool) -> list[str]:
    """``n`` captions of synth's ``web`` split (the peers' input), in row order; with
    ``long_tail`` every 10th is the next five joined and every 50th the next twenty."""
    web = synth.SynthConfig().splits["web"]
    rows = (synth.make_row(i, "web", web, 0, 32, 0.0)["caption"] for i in itertools.count())
    joined = {9: 5, 49: 20} if long_tail else {}
    return [
        ", ".join(itertools.islice(rows, joined.get(i % 50, joined.get(i % 10, 1))))
        for i in range(n)
    ]


#: OpenAI ViT-B/32's shape, as ``build_random_hf_clip`` takes it.
VIT_B32 = {"width": 768, "layers": 12, "heads": 12, "image_size": 224, "patch_size": 32}
VIT_B32_TEXT = {"embed_dim": 512, "text_width": 512, "text_heads": 8}


def vit_b32_hf_clip(folder: str) -> str:
    """A random-init transformers CLIP of OpenAI ViT-B/32's shape, saved under ``folder``."""
    return str(build_random_hf_clip(folder, **VIT_B32, **VIT_B32_TEXT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--hf", action="store_true", help="a transformers CLIP of ViT-B/32's size")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--backward", action="store_true",
        help="time forward + backward (a training step's text tower) instead of inference",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    if args.hf:
        folder = vit_b32_hf_clip(tmp.name)
        model, _, tokenizer = load_hf_clip(folder, args.device)

        def one_pass(t: torch.Tensor) -> torch.Tensor:
            return model._text_features(t[:, : max(model.used_lengths(t))])

        def padded(t: torch.Tensor) -> torch.Tensor:
            return model._text_features(t)

        name = "transformers CLIP (ViT-B/32 size)"
    else:
        model, _, tokenizer = create_clip(args.model, device=args.device)
        model.eval()

        def one_pass(t: torch.Tensor) -> torch.Tensor:
            return model._encode_positions(t[:, : int(t.argmax(dim=-1).max()) + 1])

        def padded(t: torch.Tensor) -> torch.Tensor:
            return model._encode_positions(t)

        name = f"open_clip {args.model}"
    ways = {"padded": padded, "one pass": one_pass, "groups": model.encode_text}
    result = {"model": name, "batch": args.batch, "threads": torch.get_num_threads(),
              "backward": args.backward, "sets": {}}  # fmt: skip
    print(
        f"{name}, batches of {args.batch}, {torch.get_num_threads()} threads, {args.device}"
        + (", forward + backward" if args.backward else "")
    )
    for set_name, long_tail in (("synthetic", False), ("long tail", True)):
        texts = captions(args.n, long_tail)
        batches = [
            tokenizer(texts[i : i + args.batch]).to(args.device)
            for i in range(0, len(texts), args.batch)
        ]
        used = [n for b in batches for n in (b.argmax(dim=-1) + 1).tolist()]
        seconds = {way: [] for way in ways}
        features = {}

        def run(encode, batch: torch.Tensor) -> torch.Tensor:
            if not args.backward:
                return encode(batch).float()
            out = encode(batch)
            out.float().square().sum().backward()  # gradients accumulate: only time matters
            return out.detach().float()

        with torch.inference_mode(not args.backward):
            for encode in ways.values():
                run(encode, batches[0])  # warm-up
            for _ in range(args.reps):
                for way, encode in ways.items():
                    if args.device != "cpu":
                        torch.cuda.synchronize()
                    tick = time.perf_counter()
                    features[way] = torch.cat([run(encode, b) for b in batches])
                    if args.device != "cpu":
                        torch.cuda.synchronize()
                    seconds[way].append(time.perf_counter() - tick)
        best = {way: min(s) for way, s in seconds.items()}
        row = {
            "captions": len(texts),
            "tokens_p10_p50_p90_max": [int(v) for v in np.percentile(used, [10, 50, 90, 100])],
            "captions_per_s": {w: round(len(texts) / s, 1) for w, s in best.items()},
            "groups_over_one_pass": round(best["one pass"] / best["groups"], 2),
            "groups_over_padded": round(best["padded"] / best["groups"], 2),
            "max_abs_diff_to_padded": {
                w: float((features[w] - features["padded"]).abs().max()) for w in ways
            },
        }
        result["sets"][set_name] = row
        rates = ", ".join(f"{w} {r}" for w, r in row["captions_per_s"].items())
        print(
            f"{set_name:>9} (tokens p10/p50/p90/max {row['tokens_p10_p50_p90_max']}): "
            f"captions/s {rates}; groups {row['groups_over_one_pass']}x one pass, "
            f"{row['groups_over_padded']}x padded; largest feature difference "
            f"{row['max_abs_diff_to_padded']['groups']:.1e}"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
