"""Curate scoring on real-size JPEG photos: the Beam pipeline against its bare loop, with and
without JPEG draft decoding (``decode.jpeg_draft``), and the decode share of the time.

The photos are made at run time from the two JPEGs scikit-learn ships
(``sklearn/datasets/images/china.jpg`` and ``flower.jpg``, 640x427): each distinct image is
a different crop of one of them, upscaled (bicubic) to one of ``--mp`` megapixels at 3:2 and
saved as a JPEG (quality 90); ``--n`` rows cycle through ``--distinct`` such images. The
model is ``--model`` (default open_clip's ViT-B-32 at 224 px, random weights: speed does not
depend on them).

- ``pipeline``: ``capgap curate`` on the DirectRunner (in_memory), steady state: the marginal
  rate between a run on ``--n`` rows and one on ``--scale`` times as many, with a bank of
  ``--bank`` images (``score.bank_size``) so that the bank pass is a small fixed cost.
- ``bare``: read the same Parquet with pyarrow, decode (PIL; with ``Image.draft`` to the
  model's input size when draft is on), the model's preprocess, embed, score against a bank of
  the first ``--bank`` rows; no validation, no decisions, no output.
- decode share: seconds of ``decode_image`` per row (capgap's decode + validate + the
  downscale to ``decode.model_max_side``) over the pipeline's steady seconds per row.
- cosine: per distinct image, the image embedding from the drafted decode against the one
  from the full decode (same model, same preprocess), and each of them against the model's
  own preprocessing of the whole image (decoded at full size, ``model_max_side=0``): how
  faithful the copy the model gets is.

``decode.model_max_side`` is the pipeline's default unless ``--model_max_side`` sets it: the
model's own input side (224 for ViT-B-32).

Runs alternate (bare, pipeline small, pipeline large, bare) for draft off, then on, per rep,
so that load from other processes hits both alike; each rep's pipeline rate is paired with
the mean of the bare runs around it. Prints one JSON line at the end.

    python benchmarks/real_resolution.py                          # ViT-B-32, CPU, 1 thread
    python benchmarks/real_resolution.py --device cuda --n 256 --scale 4 --threads 0
    python benchmarks/real_resolution.py --model capgap-micro-vit --n 16 --distinct 4 --mp 1,2
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sklearn
from PIL import Image

from capgap.models.clip_handler import ClipEmbedder, ClipModelConfig, model_input_side
from capgap.pipeline import curate
from capgap.transforms.decode import DecodeConfig, decode_image
from capgap.transforms.score import ScoreConfig, batch_scores

PHOTOS = [
    os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", name)
    for name in ("china.jpg", "flower.jpg")
]


def make_photos(distinct: int, megapixels: list[float]) -> list[bytes]:
    """``distinct`` JPEGs: crops of the sklearn photos upscaled to the given megapixels."""
    sources = [Image.open(p).convert("RGB") for p in PHOTOS]
    rng = np.random.default_rng(0)
    out = []
    for i in range(distinct):
        src = sources[i % len(sources)]
        mp = megapixels[i % len(megapixels)]
        width = int(round((mp * 1e6 * 1.5) ** 0.5))
        height = int(round(width / 1.5))
        cw, ch = int(src.width * 0.8), int(src.height * 0.8)
        x, y = int(rng.integers(0, src.width - cw)), int(rng.integers(0, src.height - ch))
        big = src.crop((x, y, x + cw, y + ch)).resize((width, height), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_split(folder: Path, photos: list[bytes], n: int, shards: int = 2) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("uid", pa.string()), ("image", pa.binary()), ("caption", pa.string())])
    per = -(-n // shards)
    for shard in range(shards):
        idx = range(shard * per, min(n, (shard + 1) * per))
        rows = {
            "uid": [f"photo-{i}" for i in idx],
            "image": [photos[i % len(photos)] for i in idx],
            "caption": [f"a photo number {i} of a building or a flower" for i in idx],
        }
        pq.write_table(pa.table(rows, schema=schema), folder / f"{shard}.parquet")
    return str(folder / "*.parquet")


def bare_decode(raw: bytes, draft_side: int | None) -> np.ndarray:
    im = Image.open(io.BytesIO(raw))
    if draft_side:
        im.draft("RGB", (draft_side, draft_side))
    return np.asarray(im.convert("RGB"))


def bare_loop(embedder, pattern, batch, bank, draft_side, limit=None) -> tuple[float, float]:
    """(pairs/s, share of the time spent decoding) of the minimal scorer."""
    cfg, tau = ScoreConfig(), 1.0 / embedder.logit_scale
    done, decode_s = 0, 0.0
    start = time.perf_counter()
    for path in sorted(Path(pattern).parent.glob("*.parquet")):
        for chunk in pq.ParquetFile(path).iter_batches(batch, columns=["image", "caption"]):
            raws, captions = chunk.column(0).to_pylist(), chunk.column(1).to_pylist()
            t0 = time.perf_counter()
            pixels = [bare_decode(raw, draft_side) for raw in raws]
            decode_s += time.perf_counter() - t0
            img, txt, _ = embedder.embed(pixels, captions)
            batch_scores(img, txt, bank[0], tau, cfg, bank_texts=bank[1])
            done += len(raws)
            if limit and done >= limit:
                break
    total = time.perf_counter() - start
    return done / total, decode_s / total


def pipeline_seconds(
    pattern: str, output: Path, args, draft: bool, n: int, model_side: int
) -> float:
    sets = {
        "model.name": args.model,
        "model.device": args.device,
        "model.max_batch_size": args.batch,
        "model.min_batch_size": min(args.batch, n),
        "model.torch_threads": args.threads or "null",
        "model.cpu_bf16": str(args.cpu_bf16).lower(),
        "score.bank_size": args.bank,
        "score.bank_oversample": 1.0,
        "decode.jpeg_draft": str(draft).lower(),
        "decode.model_max_side": model_side,
    }
    argv = ["--input", pattern, "--output", str(output), "--overwrite"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    start = time.perf_counter()
    manifest = curate.run([*argv, *args.runner_flags.split()])
    elapsed = time.perf_counter() - start
    assert manifest["counts"]["rows_in"] == n, manifest["counts"]
    return elapsed


def decode_seconds(photos: list[bytes], draft: bool, model_max_side: int, reps: int = 2) -> float:
    """Mean seconds of capgap's ``decode_image`` per image (the distinct ones, ``reps`` times)."""
    cfg = DecodeConfig(jpeg_draft=draft, model_max_side=model_max_side)
    start = time.perf_counter()
    for _ in range(reps):
        for raw in photos:
            decode_image(raw, cfg)
    return (time.perf_counter() - start) / (reps * len(photos))


def draft_cosines(
    embedder: ClipEmbedder, photos: list[bytes], model_max_side: int
) -> dict[str, list[float]]:
    """Per photo: drafted vs full decode at ``model_max_side``, and each against the model's
    own preprocessing of the full-size decode."""

    def embedded(draft: bool, side: int) -> np.ndarray:
        cfg = DecodeConfig(jpeg_draft=draft, model_max_side=side)
        pixels = [decode_image(raw, cfg).pixels for raw in photos]
        return embedder.embed(pixels, ["a photo"] * len(photos))[0]

    full, draft = embedded(False, model_max_side), embedded(True, model_max_side)
    whole = embedded(False, 0)

    def cos(a: np.ndarray, b: np.ndarray) -> list[float]:
        return [float(x) for x in np.sum(a * b, axis=1)]

    return {
        "draft_vs_full": cos(draft, full),
        "full_vs_whole_image": cos(full, whole),
        "draft_vs_whole_image": cos(draft, whole),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=32, help="rows of the small pipeline run")
    parser.add_argument("--scale", type=int, default=3, help="large run: n * scale rows")
    parser.add_argument("--distinct", type=int, default=10, help="distinct photos")
    parser.add_argument("--mp", default="1,2,4,8,12", help="megapixels, cycled")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bank", type=int, default=16, help="score.bank_size (both sides)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: default")
    parser.add_argument(
        "--cpu_bf16",
        action="store_true",
        help="bf16 weights on the CPU (model.cpu_bf16), both loops",
    )
    parser.add_argument(
        "--model_max_side",
        type=int,
        default=None,
        help="capgap's decode.model_max_side (default: the model's own input side)",
    )
    parser.add_argument(
        "--runner_flags",
        default="--direct_running_mode=in_memory",
        help="Beam options of the pipeline runs (e.g. '--direct_running_mode=multi_processing "
        "--direct_num_workers=8')",
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    megapixels = [float(v) for v in args.mp.split(",")]
    photos = make_photos(args.distinct, megapixels)
    sizes = [Image.open(io.BytesIO(p)).size for p in photos]
    mean_mp = statistics.mean(w * h for w, h in sizes) / 1e6
    mean_mb = statistics.mean(len(p) for p in photos) / 2**20
    print(
        f"{len(photos)} photos, {min(w * h for w, h in sizes) / 1e6:.1f}-"
        f"{max(w * h for w, h in sizes) / 1e6:.1f} MP (mean {mean_mp:.1f} MP, {mean_mb:.2f} MiB)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="capgap-realres-") as tmp:
        root = Path(tmp)
        n_big = args.n * args.scale
        small_pattern = write_split(root / "small", photos, args.n)
        big_pattern = write_split(root / "big", photos, n_big)
        embedder = ClipEmbedder(
            ClipModelConfig(
                name=args.model,
                device=args.device,
                torch_threads=args.threads,
                cpu_bf16=args.cpu_bf16,
            )
        )
        side = model_input_side(ClipModelConfig(name=args.model))  # the bare loop's draft size
        model_side = side if args.model_max_side is None else args.model_max_side
        table = pq.read_table(small_pattern.replace("*", "0"))
        bank_pixels = [bare_decode(raw, side) for raw in table["image"].to_pylist()[: args.bank]]
        bank = embedder.embed(bank_pixels, table["caption"].to_pylist()[: args.bank])[:2]
        bare_loop(embedder, small_pattern, args.batch, bank, side, limit=args.batch)  # warm-up
        pipeline_seconds(small_pattern, root / "warmup", args, True, args.n, model_side)
        results: dict[str, dict[str, list[float]]] = {}
        for rep in range(args.reps):
            for draft in (False, True):
                key = "draft" if draft else "full"
                r = results.setdefault(
                    key, {"bare": [], "bare_decode_share": [], "pipe": [], "pipe_e2e": []}
                )
                draft_side = side if draft else None
                before, share_a = bare_loop(embedder, big_pattern, args.batch, bank, draft_side)
                small = pipeline_seconds(
                    small_pattern, root / f"s{rep}{key}", args, draft, args.n, model_side
                )
                big = pipeline_seconds(
                    big_pattern, root / f"b{rep}{key}", args, draft, n_big, model_side
                )
                after, share_b = bare_loop(embedder, big_pattern, args.batch, bank, draft_side)
                r["bare"].append((before + after) / 2)
                r["bare_decode_share"].append((share_a + share_b) / 2)
                r["pipe"].append(steady_rate(args.n, small, n_big, big))
                r["pipe_e2e"].append(n_big / big)
                steady = r["pipe"][-1]
                print(
                    f"rep {rep} {key}: pipeline steady {_fmt(steady, '.2f')} pairs/s (end to end "
                    f"{r['pipe_e2e'][-1]:.2f}), bare "
                    f"{r['bare'][-1]:.2f} pairs/s (decode {r['bare_decode_share'][-1]:.0%} of "
                    f"it), ratio {_fmt(steady and steady / r['bare'][-1], '.2f')}",
                    flush=True,
                )
        report: dict = {"model": args.model, "device": args.device, "image_size": side}
        report.update(rows=n_big, mean_megapixels=round(mean_mp, 2), threads=args.threads)
        report["cpu_bf16"] = args.cpu_bf16
        report["model_max_side"] = model_side
        for key, r in results.items():
            decode_s = decode_seconds(photos, key == "draft", model_side)
            steady = [p for p in r["pipe"] if p is not None]
            pipe = statistics.median(steady) if steady else None
            ratios = [p / b for p, b in zip(r["pipe"], r["bare"], strict=True) if p is not None]
            report[key] = {
                "pipeline_pairs_per_s": _round(pipe, 2),
                "pipeline_end_to_end_pairs_per_s": round(statistics.median(r["pipe_e2e"]), 2),
                "bare_pairs_per_s": round(statistics.median(r["bare"]), 2),
                "paired_ratios": [round(x, 3) for x in ratios],
                "paired_median": _round(statistics.median(ratios) if ratios else None, 3),
                "decode_s_per_image": round(decode_s, 4),
                "pipeline_decode_share": _round(pipe and decode_s * pipe, 3),
                "bare_decode_share": round(statistics.median(r["bare_decode_share"]), 3),
            }
        for name, cos in draft_cosines(embedder, photos, model_side).items():
            report[f"{name}_cosine"] = {
                "min": round(min(cos), 5),
                "median": round(statistics.median(cos), 5),
            }
        full_steady, draft_steady = (report[k]["pipeline_pairs_per_s"] for k in ("full", "draft"))
        report["draft_speedup_pipeline"] = _round(
            full_steady and draft_steady and draft_steady / full_steady, 2
        )
        report["draft_speedup_end_to_end"] = round(
            report["draft"]["pipeline_end_to_end_pairs_per_s"]
            / report["full"]["pipeline_end_to_end_pairs_per_s"],
            2,
        )
        report["draft_speedup_decode"] = round(
            report["full"]["decode_s_per_image"] / report["draft"]["decode_s_per_image"], 2
        )
        for key in ("full", "draft"):
            r = report[key]
            print(
                f"{key:5s}: capgap curate {_fmt(r['pipeline_pairs_per_s'], '.2f')} pairs/s, bare "
                f"loop {r['bare_pairs_per_s']:.2f} pairs/s, Beam/bare "
                f"{_fmt(r['paired_median'], '.2f')}x (paired {r['paired_ratios']}); capgap decode "
                f"{r['decode_s_per_image'] * 1000:.0f} ms/image = "
                f"{_fmt(r['pipeline_decode_share'], '.0%')} of the pipeline's time per row"
            )
        print(
            f"draft decode: capgap decode {report['draft_speedup_decode']:.2f}x faster, pipeline "
            f"{_fmt(report['draft_speedup_pipeline'], '.2f')}x (steady) / "
            f"{report['draft_speedup_end_to_end']:.2f}x (end to end); embedding "
            f"cosine draft vs full: min {report['draft_vs_full_cosine']['min']:.4f}, median "
            f"{report['draft_vs_full_cosine']['median']:.4f}; against the model's own "
            f"preprocessing of the whole image: full min "
            f"{report['full_vs_whole_image_cosine']['min']:.4f}, draft min "
            f"{report['draft_vs_whole_image_cosine']['min']:.4f} (model_max_side {model_side})"
        )
        print(json.dumps(report))
    return report


def steady_rate(n_small: int, small_s: float, n_big: int, big_s: float) -> float | None:
    """Marginal pairs/s between two runs; None when the extra rows cost less than 5% of the
    big run (start-up noise then swamps them: use a larger --n / --scale)."""
    extra = big_s - small_s
    return (n_big - n_small) / extra if extra > 0.05 * big_s else None


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a (too few rows to measure)" if x is None else format(x, spec)


if __name__ == "__main__":
    main()
