"""Peer benchmark (issue #20): capgap curate against clip-retrieval and Data-Juicer.

Same input pairs, same transformers CLIP checkpoint, same machine, one run:

- ``capgap``: ``capgap curate`` end to end (read Parquet, decode + validate, embed both
  towers, bank + certainty / imbalance scores, decide, write curated/ rejected/ errors/
  Parquet + manifest), scoring with ``model.hf_model=CHECKPOINT``;
- ``clip-retrieval``: ``clip_retrieval.clip_inference`` on WebDataset tars of the same
  pairs (image + text embeddings to .npy, captions to Parquet: embeddings only), the
  model loaded through all_clip's ``hf_clip:`` prefix from the same folder;
- ``data-juicer``: Data-Juicer's ``image_text_similarity_filter`` (per-sample CLIP
  similarity + keep / drop) on a JSONL of the same pairs, ``hf_clip`` = the same folder.

Each peer lives in its own venv under ``.peers/`` (git-ignored), made by this script with
``python3.11 -m venv`` and pip from the package registry (torch first, pinned to the
version capgap uses where the peer accepts it). Model hubs are never contacted: every
tool runs with ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``. Input conversion and
venv creation happen before the timed part; the timed part is each tool's whole command
(interpreter start and model load included, for every tool alike), run as a subprocess
with the same torch thread count. A peer that cannot be installed or run is reported
with its error and the others still run.

    python benchmarks/peers.py                       # ViT-B/32-shaped random CLIP, 256 pairs
    python benchmarks/peers.py --n 2000 --layers 6   # more pairs, a smaller model
    python benchmarks/peers.py --skip data-juicer    # leave a peer out
    python benchmarks/peers.py --no_bf16             # capgap in float32 only

Order: the model forward alone (the same checkpoint's two towers, batched, on tensors in
memory, the text tower in capgap's length groups: no I/O, model load not timed), once with
torch's linear layers (what a batched float32 tool running the checkpoint as transformers
builds it can reach here) and once routed through oneDNN as capgap's scorer runs them
(``model.cpu_matmul``: capgap's own ceiling), then capgap in float32 like the peers, capgap
with bf16 weights on the CPU (``model.cpu_bf16``: fast on CPUs with AMX, slow on AVX2-only
ones; unless ``--no_bf16``), then each peer followed by capgap in float32 again. This VM's
speed drifts 10-20% within minutes, so each peer's float32 ratio is to the mean rate of the
two capgap runs around it; capgap's row is the median of its float32 runs (all of them in
the JSON).

Prints a table (tool, what it computes, pairs, seconds, pairs/s, ratio to capgap float32 and
to bf16), how far bf16 moves capgap's scores and decisions, both forward-alone rates with
their ratio to each peer, capgap's share of its own towers' rate, and writes
it all as JSON (``--json``, default ``.peers/results.json``). Goals: capgap >= 1.0x
clip-retrieval (while doing more than embed) and >= 3x Data-Juicer.
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before cluster_check's import of Beam logs its apitools line

import argparse
import glob
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from cluster_check import rows_of  # a curate output's rows by outcome and uid

ROOT = Path(__file__).resolve().parent.parent
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
PEERS = {
    # clip-anytorch imports pkg_resources, which setuptools 81 dropped. transformers pinned to
    # what pip chose on 2026-12-02: on 2026-12-04 an unpinned one backtracked to tokenizers
    # 0.10.3, an sdist whose Rust build fetches a crate from GitHub (unreachable here).
    "clip-retrieval": ["clip-retrieval==2.45.0", "transformers==4.57.6", "setuptools<81"],
    # Data-Juicer imports aiohttp at start-up without declaring it.
    "data-juicer": ["py-data-juicer==1.6.1", "transformers", "aiohttp"],
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}

CLIP_RETRIEVAL_RUN = """
import sys
from clip_retrieval.clip_inference.main import main
main(input_dataset=sys.argv[1], output_folder=sys.argv[2], input_format="webdataset",
     batch_size=int(sys.argv[4]), num_prepro_workers=int(sys.argv[5]), enable_text=True,
     enable_image=True, enable_metadata=False, wds_image_key="png", wds_caption_key="txt",
     clip_model="hf_clip:" + sys.argv[3], use_jit=False, enable_wandb=False,
     output_partition_count=1, write_batch_size=100000, clip_cache_path=sys.argv[2] + "_cache")
"""

DATA_JUICER_CONFIG = """project_name: capgap-peers
dataset_path: {dataset}
export_path: {export}
np: 1
text_keys: text
image_key: images
open_tracer: false
use_cache: false
process:
  - image_text_similarity_filter:
      hf_clip: {model}
      min_score: 0.0
      max_score: 1.0
"""


# The same checkpoint's two towers alone, batched, on tensors already in memory: no reading,
# decoding, preprocessing, scoring or writing, and model loading left out of the time; the
# text tower as capgap runs it (each batch in groups of similar caption length, each cut
# after its longest caption: capgap.models.text_groups). Twice: with torch's own linear layers
# (``stock``: the most a batched float32 tool running the checkpoint as transformers builds
# it can do on this machine) and with them routed through oneDNN as capgap's scorer runs them
# (``onednn``, capgap.models.onednn_linear: capgap's own ceiling). Each tower's rate against a
# bare float32 GEMM of its MLP's shape, through torch's linear and through oneDNN's.
MODEL_ONLY_RUN = """
import glob, json, sys, time
import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import FlopCounterMode
from capgap.core.malloc import keep_large_blocks
from capgap.models.hf_clip import load_hf_clip
from capgap.models.onednn_linear import linear as onednn_linear
from capgap.models.onednn_linear import onednn_linear_available, use_onednn_linears
keep_large_blocks()
folder, pattern, batch, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
captions = [c for f in sorted(glob.glob(pattern)) for c in pq.read_table(f)["caption"].to_pylist()]
encoder, _, tokenizer = load_hf_clip(folder)
model = encoder.hf
side = model.config.vision_config.image_size
pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
vision = model.config.vision_config
tokens = (side // vision.patch_size) ** 2 + 1
a = torch.randn(batch * tokens, vision.hidden_size)
w = torch.randn(vision.intermediate_size, vision.hidden_size)
with FlopCounterMode(display=False) as counter:
    model.get_image_features(pixel_values=pixels[:1])
out = {"pairs": len(captions), "image_flop": counter.get_total_flops()}

def towers():
    model.get_image_features(pixel_values=pixels)  # warm-up
    model.get_image_features(pixel_values=pixels[: len(captions) % batch or batch])
    encoder.encode_text(tokenizer(captions[:batch]))
    image_seconds, start = 0.0, time.perf_counter()
    for i in range(0, len(captions), batch):
        chunk = captions[i : i + batch]
        ids = tokenizer(chunk)
        tick = time.perf_counter()
        model.get_image_features(pixel_values=pixels[: len(chunk)])
        image_seconds += time.perf_counter() - tick
        encoder.encode_text(ids)
    return time.perf_counter() - start, image_seconds

def gemm(linear):
    linear(a, w, None)
    tick = time.perf_counter()
    for _ in range(5):
        linear(a, w, None)
    return 5 * 2 * a.shape[0] * a.shape[1] * w.shape[0] / (time.perf_counter() - tick)

with torch.inference_mode():
    seconds, image_seconds = towers()
    out["stock"] = {"seconds": seconds, "image_seconds": image_seconds,
                    "gemm_flop_per_s": gemm(torch.nn.functional.linear)}
    if onednn_linear_available():
        use_onednn_linears(encoder)
        seconds, image_seconds = towers()
        out["onednn"] = {"seconds": seconds, "image_seconds": image_seconds,
                         "gemm_flop_per_s": gemm(onednn_linear)}
print(json.dumps(out))
"""


def log(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def ensure_venv(root: Path, name: str) -> Path:
    """``root/name`` with torch and the peer's package; returns its python."""
    venv = root / name
    python = venv / "bin" / "python"
    marker = venv / ".installed"  # the requirements installed, then the versions pip chose
    wanted = " ".join([*TORCH, *PEERS[name]])
    if marker.exists() and marker.read_text().split("\n", 1)[0] == wanted:
        return python
    if not python.exists():
        subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *TORCH], check=True)
    proc = subprocess.run([*pip, *PEERS[name]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(PEERS[name])} failed:\n{proc.stderr[-3000:]}")
    marker.write_text(f"{wanted}\n{versions(python)}")
    return python


def versions(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    keep = ("torch", "torchvision", "transformers", "clip-retrieval", "all-clip", "py-data-juicer")
    return ", ".join(
        line for line in out.splitlines() if line.split("==")[0].lower().replace("_", "-") in keep
    )


def make_input(work: Path, n: int, shards: int) -> list[dict]:
    """Synth ``n`` web pairs at 224 px as Parquet; returns the rows (uid, png, caption)."""
    web = work / "synth"
    if not list(web.glob("web/*.parquet")):
        subprocess.run(
            [*capgap_cmd(), "synth", "--out", str(web), "--split", "web", "--n", str(n)]
            + ["--shards", str(shards), "--image_size", "224"],
            check=True,
        )
    rows = []
    for path in sorted(glob.glob(str(web / "web" / "*.parquet"))):
        for row in pq.read_table(path, columns=["uid", "image", "caption"]).to_pylist():
            image = row["image"]
            png = image["bytes"] if isinstance(image, dict) else image
            rows.append({"uid": row["uid"], "png": png, "caption": row["caption"]})
    if len(rows) != n:
        raise RuntimeError(f"{web} holds {len(rows)} rows, not {n}: delete it and rerun")
    return rows


def write_tars(rows: list[dict], folder: Path, shards: int) -> str:
    """The pairs as WebDataset tars (key.png + key.txt); returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i, row in enumerate(rows[s * per : (s + 1) * per]):
                key = f"{s:05d}{i:05d}"
                for ext, data in (("png", row["png"]), ("txt", row["caption"].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def write_jsonl(rows: list[dict], folder: Path) -> Path:
    """The pairs as Data-Juicer's multimodal JSONL (image files + ``<__dj__image>`` text)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    with path.open("w") as f:
        for i, row in enumerate(rows):
            image = images / f"{i:06d}.png"
            image.write_bytes(row["png"])
            text = f"<__dj__image> {row['caption']} <|__dj__eoc|>"
            f.write(json.dumps({"text": text, "images": [str(image)]}) + "\n")
    return path


def capgap_cmd() -> list[str]:
    return [sys.executable, "-c", "from capgap.pipeline.cli import entry; entry()"]


def timed(cmd: list[str], env: dict, logfile: Path) -> float:
    t0 = time.perf_counter()
    with logfile.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = logfile.read_text()[-2500:]
        raise RuntimeError(f"exit {proc.returncode} ({logfile}):\n{tail}")
    return seconds


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    return next(names, "unknown")


def precision_agreement(fp32_out: Path, bf16_out: Path) -> dict:
    """How far bf16 weights moves capgap's outputs: the largest score differences over the
    same rows, and the share of rows whose decision is the same."""

    def scored(out: Path) -> dict[str, dict]:
        rows = rows_of(out)
        return {**rows["curated"], **rows["rejected"]}

    a, b = scored(fp32_out), scored(bf16_out)
    common = sorted(set(a) & set(b))
    return {
        "rows": len(common),
        "same_decision": round(
            sum(a[u]["decision"] == b[u]["decision"] for u in common) / max(len(common), 1), 4
        ),
        **{
            f"max_abs_diff_{k}": round(
                max((abs(a[u][k] - b[u][k]) for u in common), default=0.0), 5
            )
            for k in ("clip_score", "certainty", "imbalance")
        },
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="pairs")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--width", type=int, default=768, help="vision tower width")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--text_width", type=int, default=512)
    ap.add_argument("--text_heads", type=int, default=8)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--embed_dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="embedding batch, every tool")
    ap.add_argument("--bank_size", type=int, default=128, help="capgap score.bank_size")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--root", default=str(ROOT / ".peers"), help="venvs + work files")
    ap.add_argument("--skip", action="append", default=[], choices=sorted(PEERS))
    ap.add_argument("--json", default=None, help="default ROOT/results.json")
    ap.add_argument(
        "--no_bf16", dest="bf16", action="store_false",
        help="skip capgap's second run with bf16 weights (model.cpu_bf16)",
    )  # fmt: skip
    ap.add_argument(
        "--capgap_set", action="append", default=[], metavar="KEY=VALUE",
        help="a capgap --set for every capgap run (e.g. decode.jpeg_draft=true)",
    )  # fmt: skip
    args = ap.parse_args(argv)

    root = Path(args.root)
    work = root / f"work-n{args.n}-w{args.width}-l{args.layers}"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **OFFLINE}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    # Untimed: model, input in each tool's format, venvs.
    from capgap.models.hf_clip import build_random_hf_clip
    from capgap.transforms.bank import candidate_count
    from capgap.transforms.score import ScoreConfig

    model = work / "clip"
    if not (model / "config.json").exists():
        build_random_hf_clip(
            model, "clip", width=args.width, layers=args.layers, heads=args.heads,
            image_size=224, patch_size=args.patch, embed_dim=args.embed_dim,
            text_width=args.text_width, text_heads=args.text_heads,
        )  # fmt: skip
    rows = make_input(work, args.n, args.shards)
    tars = write_tars(rows, work / "wds", args.shards)
    jsonl = write_jsonl(rows, work / "dj")
    pythons: dict[str, Path] = {}
    failures: dict[str, str] = {}
    for name in PEERS:
        if name in args.skip:
            continue
        try:
            log(f"venv for {name} ...")
            pythons[name] = ensure_venv(root, name)
        except Exception as e:  # noqa: BLE001 - record why and keep the other peers
            failures[name] = f"install: {e}"

    results = []

    def record(tool: str, computes: str, seconds: float, note: str = "", **extra) -> dict:
        row = {"tool": tool, "computes": computes, "pairs": args.n, "seconds": round(seconds, 2),
               "pairs_per_s": round(args.n / seconds, 2), "note": note, **extra}  # fmt: skip
        results.append(row)
        return row

    def capgap_seconds(folder: str, extra: list[str]) -> float:
        """One timed ``capgap curate`` of the input into ``work/folder``."""
        cmd = [*capgap_cmd(), "curate", "--input", str(work / "synth" / "web" / "*.parquet")]
        cmd += ["--output", str(work / folder), "--device", "cpu", "--overwrite"]
        for s in (
            f"model.hf_model={model}", f"model.min_batch_size={args.batch}",
            f"model.max_batch_size={args.batch}", f"score.bank_size={args.bank_size}",
            f"model.torch_threads={args.threads}", *args.capgap_set, *extra,
        ):  # fmt: skip
            cmd += ["--set", s]
        return timed(cmd, env, work / f"{folder}.log")

    # Timed: each tool's whole command. capgap in float32 (the peers' precision) before and
    # after each peer (this VM's speed drifts 10-20% within minutes: each peer's ratio is to
    # the mean rate of the two float32 runs around it), once with bf16 weights
    # (model.cpu_bf16) unless --no_bf16, and the ceiling (see MODEL_ONLY_RUN) first.
    log("model forward alone ...")
    cmd = [sys.executable, "-c", MODEL_ONLY_RUN, str(model)]
    cmd += [str(work / "synth" / "web" / "*.parquet"), str(args.batch), str(args.threads)]
    alone = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])  # fmt: skip
    forward_alone = {
        layers: {"pairs": alone["pairs"], "seconds": round(run["seconds"], 2),
                 "pairs_per_s": round(alone["pairs"] / run["seconds"], 2),
                 "image_tower_gflop_per_s": round(
                     alone["image_flop"] * alone["pairs"] / run["image_seconds"] / 1e9, 1),
                 "gemm_gflop_per_s": round(run["gemm_flop_per_s"] / 1e9, 1)}
        for layers, run in alone.items() if layers in ("stock", "onednn")
    }  # fmt: skip
    # capgap's own ceiling: its towers as its scorer runs them (oneDNN where it routes them).
    ceiling = forward_alone.get("onednn", forward_alone["stock"])

    fp32_seconds: list[float] = []  # every float32 run, in order

    def capgap_fp32() -> float:
        log(f"capgap curate (float32, run {len(fp32_seconds) + 1}) ...")
        fp32_seconds.append(capgap_seconds("capgap-out", []))
        return args.n / fp32_seconds[-1]

    before = capgap_fp32()
    candidates = min(args.n, candidate_count(ScoreConfig(bank_size=args.bank_size)))
    counts = json.loads((work / "capgap-out" / "manifest.json").read_text()).get("counts", {})
    capgap_row = record(
        "capgap curate",
        "decode+validate, image+text embed, bank scores, decide, write Parquet",
        fp32_seconds[0],
        f"rows_in {counts.get('rows_in')}: curated {counts.get('curated')}, rejected "
        f"{counts.get('rejected')}, errors {counts.get('errors')}; score.bank_size "
        f"{args.bank_size} (the bank pass embeds {candidates} rows, its bank and spares, "
        "and the main pass reuses their embeddings)"
        + "".join(f"; --set {kv}" for kv in args.capgap_set),
    )
    if args.bf16:
        log("capgap curate, bf16 weights ...")
        record(
            "capgap curate, bf16 weights",
            capgap_row["computes"],
            capgap_seconds("capgap-bf16-out", ["model.cpu_bf16=true"]),
            "model.cpu_bf16=true",
        )
    agreement = (
        precision_agreement(work / "capgap-out", work / "capgap-bf16-out") if args.bf16 else None
    )

    def peer(name: str, tool: str, computes: str, cmd: list[str], note) -> None:
        """Time a peer, then capgap float32 again; record both rates around it."""
        nonlocal before
        log(f"{tool} ...")
        try:
            seconds = timed(cmd, env, work / f"{name}.log")
            row = record(tool, computes, seconds, note())
        except Exception as e:  # noqa: BLE001 - record why and keep the other peers
            failures[name] = f"run: {e}"
            return
        after = capgap_fp32()
        row["capgap_rates_around"] = [round(before, 2), round(after, 2)]
        before = after

    if "clip-retrieval" in pythons:
        python = pythons["clip-retrieval"]
        emb = work / "cr-out"
        cmd = [str(python), "-c", CLIP_RETRIEVAL_RUN, tars, str(emb), str(model)]
        cmd += [str(args.batch), str(args.threads)]

        def cr_note(emb: Path = emb, python: Path = python) -> str:
            n_img = sum(len(np.load(p)) for p in glob.glob(str(emb / "img_emb" / "*.npy")))
            return f"{n_img} image embeddings written; {versions(python)}"

        peer(
            "clip-retrieval",
            "clip-retrieval clip_inference",
            "image+text embeddings to .npy (no scores, no decision)",
            cmd,
            cr_note,
        )

    if "data-juicer" in pythons:
        python = pythons["data-juicer"]
        config = work / "dj" / "config.yaml"
        export = work / "dj-out" / "kept.jsonl"
        config.write_text(DATA_JUICER_CONFIG.format(dataset=jsonl, export=export, model=model))
        cmd = [str(python), "-m", "data_juicer.tools.process_data", "--config", str(config)]

        def dj_note(export: Path = export, python: Path = python) -> str:
            kept = sum(1 for _ in export.open()) if export.exists() else 0
            return f"{kept} kept; {versions(python)}"

        peer(
            "data-juicer",
            "data-juicer image_text_similarity_filter",
            "per-sample CLIP similarity + keep/drop, export JSONL",
            cmd,
            dj_note,
        )

    # capgap's row: the median of its float32 runs; each peer's ratio: the mean of the two
    # runs around it (with no peer run, the one run).
    rates = [args.n / s for s in fp32_seconds]
    capgap_row["seconds"] = round(statistics.median(fp32_seconds), 2)
    capgap_row["pairs_per_s"] = round(args.n / capgap_row["seconds"], 2)
    capgap_row["float32_runs_pairs_per_s"] = [round(r, 2) for r in rates]
    capgap_row["float32_runs_seconds"] = [round(s, 2) for s in fp32_seconds]
    base = capgap_row["pairs_per_s"]
    base_bf16 = results[1]["pairs_per_s"] if args.bf16 else None
    for r in results:
        around = r.get("capgap_rates_around")
        r["capgap_ratio"] = round(
            (statistics.mean(around) if around else base) / r["pairs_per_s"], 2
        )
        if base_bf16:
            r["capgap_bf16_ratio"] = round(base_bf16 / r["pairs_per_s"], 2)
    report = {
        "model": {k: getattr(args, k) for k in ("width", "layers", "heads", "text_width",
                                                "text_heads", "patch", "embed_dim")},
        "image_size": 224, "batch": args.batch, "threads": args.threads, "cpu": cpu_name(),
        "capgap_sets": args.capgap_set,
        "results": results, "failures": failures, "fp32_vs_bf16": agreement,
        "model_forward_alone": forward_alone,
    }  # fmt: skip
    bf16_col = f" {'bf16 x':>8}" if base_bf16 else ""
    if args.capgap_set:
        print("every capgap run with --set " + " --set ".join(args.capgap_set))
    print(
        f"{'tool':44} {'pairs':>6} {'seconds':>8} {'pairs/s':>8} {'capgap x':>9}{bf16_col}"
        "  computes"
    )
    for r in results:
        ratio_bf16 = f" {r['capgap_bf16_ratio']:7.2f}x" if base_bf16 else ""
        print(
            f"{r['tool']:44} {r['pairs']:6d} {r['seconds']:8.1f} {r['pairs_per_s']:8.2f} "
            f"{r['capgap_ratio']:8.2f}x{ratio_bf16}  {r['computes']}"
        )
    print(
        "capgap float32 runs, pairs/s in order (one first, then one after each peer; a "
        "peer's ratio is to the mean of the runs around it): "
        + ", ".join(f"{r:.2f}" for r in rates)
        + " ("
        + ", ".join(f"{s:.1f}" for s in fp32_seconds)
        + " s)"
    )
    share = rates[0] / ceiling["pairs_per_s"]
    peers_run = [r for r in results if not r["tool"].startswith("capgap")]
    for layers, alone_run in forward_alone.items():
        label = {"stock": "torch's linear layers", "onednn": "linears through oneDNN"}[layers]
        print(
            f"float32 model forward alone, {label} (both towers, batch {args.batch}, tensors "
            f"in memory, load not timed, run before capgap's first): "
            f"{alone_run['pairs_per_s']:.2f} pairs/s; over "
            + (", ".join(f"{r['tool'].split()[0]} "
                         f"{alone_run['pairs_per_s'] / r['pairs_per_s']:.2f}x" for r in peers_run)
               or "no peer")
            + f"; image tower {alone_run['image_tower_gflop_per_s']:.0f} GFLOP/s (torch's FLOP "
            f"counter) against a bare GEMM of its MLP's shape at "
            f"{alone_run['gemm_gflop_per_s']:.0f} GFLOP/s"
        )  # fmt: skip
    print(
        f"capgap float32's first run reaches {share:.0%} of its own towers' rate alone "
        f"({ceiling['pairs_per_s']:.2f} pairs/s)"
    )
    if agreement:
        print(f"capgap float32 vs bf16 weights, same rows: {json.dumps(agreement)}")
    for name, why in failures.items():
        print(f"{name}: FAILED: {why.splitlines()[0]}\n  see the JSON for the whole error")
    path = Path(args.json or root / "results.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
