"""``capgap eval``: gap, geometry, retrieval, zero-shot, object bias and robustness of a run.

Loads a trained run (``config.yaml`` + ``model.safetensors``, see
``capgap.models.clip_factory.load_run``), embeds the held-out pairs in batches,
and writes one flat JSON of metrics, the resolved eval config
(``eval_config.yaml``) and the embeddings the report plots (``embeddings.npz``:
``img``, ``txt``, and the label columns when present), all next to ``--out``.
Metric definitions: capgap.models.metrics / robustness / zero_shot and SCIENCE.md.

The ground-truth label columns (object, colour, size, position, background,
texture) drive zero-shot accuracy and MOAD; without them both are skipped and
the JSON says so under ``skipped``.

    capgap eval runs/clip-web --data 'data/synth/test/*.parquet'           # -> runs/clip-web/eval.json
    capgap eval runs/clip-web --out results/web/eval.json --set robustness.sigmas=[0.1,0.3]

In-process (demo, experiments): ``evaluate(run_dir, cfg) -> dict``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from capgap.core import world
from capgap.core.config import (
    parse_command,
    save_resolved,
)
from capgap.core.files import expand_paths
from capgap.core.images import rgb_image
from capgap.models import metrics, robustness, zero_shot
from capgap.models.clip_embed import encode_pairs


@dataclass
class ZeroShotConfig:
    # task -> prompt templates; "{}" is the class value, "{object}" expands over all objects
    templates: dict[str, list[str]] = field(default_factory=zero_shot.default_templates)


@dataclass
class RobustnessConfig:
    # expected norm of the Gaussian noise added to unit embeddings (per-coordinate std sigma/sqrt(D))
    sigmas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
    bits: list[int] = field(default_factory=lambda: [8, 4])  # uniform per-dimension quantisation
    n_trials: int = 3  # seeded noise draws averaged per sigma
    perturb: Literal["query", "both"] = "query"  # which side of each prediction is perturbed
    moved: Literal["image", "text"] = "image"  # modality the mean shift moves
    mode: Literal["project", "translate"] = "project"  # see capgap.models.robustness
    # Held-out pairs from the training distribution (Parquet glob), the fit set of the mean
    # shift as Chowers et al. fit it: keys heldout_shift_*, beside shift_* (fitted on the
    # evaluated pairs themselves). None: only shift_*.
    shift_fit_data: str | None = None


@dataclass
class EvalConfig:
    data: str = field(
        default="data/synth/test/*.parquet", metadata={"help": "held-out Parquet shard glob(s)"}
    )
    out: str | None = field(
        default=None, metadata={"help": "output JSON (default RUN_DIR/eval.json)"}
    )
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, mps"})
    batch_size: int = field(default=256, metadata={"help": "embedding batch size"})
    cpu_matmul: Literal["auto", "onednn", "torch"] = field(
        default="auto",
        metadata={"help": "float32 linears on CPU: auto (oneDNN on x86-64), onednn, torch"},
    )
    max_samples: int | None = field(
        default=5000, metadata={"help": "evaluate the first N pairs (pairwise metrics are O(N^2))"}
    )
    seed: int = field(default=0, metadata={"help": "seed for separability split and noise"})
    threads: int = field(
        default=0, metadata={"help": "torch CPU threads; 0 = torch's default (use 1 on busy CPUs)"}
    )
    image_column: str = "image"
    caption_column: str = "caption"
    # Other caption columns of the same images, each a test view with gap and retrieval
    # metrics prefixed by its name (e.g. terse: caption_terse -> terse_l2m, terse_i2t_r@1).
    views: dict[str, str] = field(default_factory=dict)
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    ablate_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    save_embeddings: bool = field(default=True, metadata={"help": "write embeddings.npz"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        if self.cpu_matmul not in ("auto", "onednn", "torch"):
            raise ValueError(f"cpu_matmul must be auto, onednn or torch, not {self.cpu_matmul!r}")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError("max_samples must be >= 2")
        if any(s < 0 for s in self.robustness.sigmas):
            raise ValueError("robustness.sigmas must be >= 0")
        if any(b < 1 for b in self.robustness.bits):
            raise ValueError("robustness.bits must be >= 1")


@dataclass
class EmbeddedSplit:
    """L2-normalised embeddings of a split, with its uids and label columns (if any)."""

    img: np.ndarray
    txt: np.ndarray
    uids: list[str]
    labels: dict[str, list[str]] | None


# --- embedding --------------------------------------------------------------------------------


def read_pairs(
    data: str, cfg: EvalConfig
) -> tuple[list[bytes], list[str], list[str], dict[str, list[str]] | None]:
    """(image bytes, captions, uids, labels or None) of the first ``max_samples`` rows."""
    images: list[bytes] = []
    captions: list[str] = []
    uids: list[str] = []
    labels: dict[str, list[str]] | None = None
    limit = cfg.max_samples if cfg.max_samples is not None else math.inf
    for path in expand_paths(data):
        names = set(pq.read_schema(path).names)
        missing = {cfg.image_column, cfg.caption_column} - names
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
        label_cols = [c for c in world.LABEL_COLUMNS if c in names]
        has_labels = len(label_cols) == len(world.LABEL_COLUMNS)
        if labels is None and not uids:
            labels = {c: [] for c in world.LABEL_COLUMNS} if has_labels else None
        elif (labels is not None) != has_labels:
            raise ValueError(f"{path}: label columns differ from the shards before it")
        columns = [cfg.image_column, cfg.caption_column, *(label_cols if has_labels else [])]
        if "uid" in names:
            columns.append("uid")
        table = pq.read_table(path, columns=columns)
        take = int(min(table.num_rows, limit - len(uids)))
        table = table.slice(0, take)
        images += table.column(cfg.image_column).to_pylist()
        captions += table.column(cfg.caption_column).to_pylist()
        if "uid" in names:
            uids += [str(u) for u in table.column("uid").to_pylist()]
        else:
            uids += [f"{path.name}:{i}" for i in range(take)]
        if labels is not None:
            for c in world.LABEL_COLUMNS:
                labels[c] += table.column(c).to_pylist()
        if len(uids) >= limit:
            break
    if len(uids) < 2:
        raise ValueError(f"{data}: need at least 2 pairs to evaluate, found {len(uids)}")
    return images, captions, uids, labels


def embed_pairs(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    images: Sequence[bytes],
    captions: Sequence[str],
    uids: Sequence[str],
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 (image, caption) embeddings, in batches.

    Each batch's float32 features come from ``clip_embed.encode_pairs`` unnormalised; the
    whole split is then normalised at once in float64 (``metrics.l2_normalize``) and cast
    back to float32.
    """
    device = next(model.parameters()).device
    model.eval()
    img_chunks, txt_chunks = [], []
    bar = tqdm(total=len(images), desc="embed", unit="pair", disable=not progress)
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        pixels = torch.stack(
            [preprocess(rgb_image(images[i], f"pair {uids[i]}")) for i in range(start, stop)]
        )
        tokens = tokenizer(list(captions[start:stop]))
        img, txt = encode_pairs(model, pixels, tokens, device, normalize=False)
        img_chunks.append(img.cpu())
        txt_chunks.append(txt.cpu())
        bar.update(stop - start)
    bar.close()
    img = metrics.l2_normalize(torch.cat(img_chunks).numpy()).astype(np.float32)
    txt = metrics.l2_normalize(torch.cat(txt_chunks).numpy()).astype(np.float32)
    return img, txt


def embed_split(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    cfg: EvalConfig,
    data: str | None = None,
) -> EmbeddedSplit:
    """Embeddings of the first ``max_samples`` pairs of ``data`` (default ``cfg.data``)."""
    images, captions, uids, labels = read_pairs(data or cfg.data, cfg)
    img, txt = embed_pairs(
        model, preprocess, tokenizer, images, captions, uids, cfg.batch_size, cfg.progress
    )
    return EmbeddedSplit(img=img, txt=txt, uids=list(uids), labels=labels)


# --- metrics on embeddings --------------------------------------------------------------------


def _zs_means(
    out: dict[str, Any], tasks: Sequence[str], prefixes: Sequence[str] = ("", "shift_")
) -> dict[str, float]:
    """``<prefix>zs_mean_<suffix>``: zero-shot robustness averaged over tasks, per prefix."""
    means: dict[str, float] = {}
    for prefix in prefixes:
        first = f"{prefix}zs_{tasks[0]}_"
        for key in [k for k in out if k.startswith(first)]:
            suffix = key[len(first) :]
            values = [out[f"{prefix}zs_{t}_{suffix}"] for t in tasks]
            means[f"{prefix}zs_mean_{suffix}"] = float(np.mean(values))
    return means


def compute_metrics(
    split: EmbeddedSplit,
    classifiers: dict[str, np.ndarray] | None,
    cfg: EvalConfig,
    shift_fit: EmbeddedSplit | None = None,
) -> dict[str, Any]:
    """Every metric of eval from embeddings (and zero-shot class weights), flat.

    ``shift_fit``: held-out pairs the mean shift is also fitted on (``heldout_shift_*``)."""
    img, txt = split.img, split.txt
    out: dict[str, Any] = {"n_pairs": len(img), "embed_dim": int(img.shape[1])}
    skipped: list[str] = []
    out.update(
        metrics.gap_metrics(
            img, txt, seed=cfg.seed, recall_ks=cfg.recall_ks, ablate_ks=cfg.ablate_ks
        )
    )
    order, abs_diff = metrics.gap_dimensions(img, txt)
    out["gap_top_dims"] = [int(d) for d in order[:8]]

    tasks: list[robustness.Task] = []
    zs_names: list[str] = []
    if split.labels is None:
        skipped += [
            "zero_shot: no ground-truth label columns",
            "moad: no ground-truth label columns",
        ]
    else:
        attrs = {a: split.labels[a] for a in world.ATTRIBUTE_NAMES}
        for name, emb in (("img", img), ("txt", txt)):
            for key, value in metrics.moad(emb, split.labels["object"], attrs).items():
                out["moad_" + name if key == "moad" else f"moad_{name}_{key}"] = value
        if classifiers:
            out.update(zero_shot.zero_shot_accuracies(img, split.labels, classifiers))
            for task, weights in classifiers.items():
                targets = zero_shot.label_indices(task, split.labels[task])
                tasks.append(robustness.Task(f"zs_{task}", img, weights, "image", targets))
                zs_names.append(task)
        else:
            skipped.append("zero_shot: no prompt templates configured")
    ids = np.arange(len(img))
    tasks.append(robustness.Task("i2t", img, txt, "image", ids))
    tasks.append(robustness.Task("t2i", txt, img, "text", ids))
    rc = cfg.robustness
    settings = dict(
        sigmas=rc.sigmas,
        bits=rc.bits,
        n_trials=rc.n_trials,
        seed=cfg.seed,
        perturb=rc.perturb,
        moved=rc.moved,
        mode=rc.mode,
    )
    out.update(robustness.robustness_metrics(tasks, img, txt, **settings))
    prefixes = ["", "shift_"]
    if shift_fit is not None:
        fit = (shift_fit.img, shift_fit.txt)
        out.update(
            robustness.robustness_metrics(
                tasks, img, txt, fit=fit, shift_prefix="heldout_shift_", unshifted=False, **settings
            )
        )
        out["heldout_shift_fit_pairs"] = len(shift_fit.img)
        prefixes.append("heldout_shift_")
    if zs_names:
        out.update(_zs_means(out, zs_names, prefixes))
    out["robustness_sigmas"] = list(rc.sigmas)
    out["robustness_bits"] = list(rc.bits)
    out["zero_shot_tasks"] = zs_names
    out["skipped"] = skipped
    return out


def view_metrics(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    cfg: EvalConfig,
    view: str,
    column: str,
    skipped: list[str],
) -> dict[str, float]:
    """Gap and retrieval of the same images with the captions in ``column``, keys prefixed
    ``<view>_`` (L2M, RMG, linear separability, R@k both ways); a missing column is skipped."""
    if column not in pq.read_schema(expand_paths(cfg.data)[0]).names:
        skipped.append(f"view {view}: no column {column!r} in {cfg.data}")
        return {}
    split = embed_split(model, preprocess, tokenizer, replace(cfg, caption_column=column))
    img, txt = split.img, split.txt
    out = {
        "l2m": metrics.l2m(img, txt),
        "rmg": metrics.rmg(img, txt),
        "linear_separability": metrics.linear_separability(img, txt, seed=cfg.seed),
        **metrics.retrieval_recall(img, txt, ks=cfg.recall_ks),
    }
    return {f"{view}_{key}": value for key, value in out.items()}


# --- whole evaluation -------------------------------------------------------------------------


def evaluate_model(
    model: torch.nn.Module,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    cfg: EvalConfig,
) -> tuple[dict[str, Any], EmbeddedSplit]:
    """Embed ``cfg.data`` with an in-memory model and compute every metric; writes nothing."""
    t0 = time.perf_counter()
    split = embed_split(model, preprocess, tokenizer, cfg)
    t1 = time.perf_counter()
    classifiers = None
    if split.labels is not None and cfg.zero_shot.templates:
        classifiers = zero_shot.build_classifiers(
            model, tokenizer, cfg.zero_shot.templates, batch_size=cfg.batch_size
        )
    shift_fit = None
    if cfg.robustness.shift_fit_data:
        shift_fit = embed_split(model, preprocess, tokenizer, cfg, cfg.robustness.shift_fit_data)
    out = compute_metrics(split, classifiers, cfg, shift_fit)
    for view, column in cfg.views.items():
        out.update(view_metrics(model, preprocess, tokenizer, cfg, view, column, out["skipped"]))
    out["embed_seconds"] = round(t1 - t0, 3)
    out["metrics_seconds"] = round(time.perf_counter() - t1, 3)
    return out, split


def output_paths(run_dir: str | Path, cfg: EvalConfig) -> tuple[Path, Path]:
    """(eval JSON, embeddings.npz) for a run and config."""
    out = Path(cfg.out) if cfg.out else Path(run_dir) / "eval.json"
    return out, out.parent / "embeddings.npz"


def save_embeddings(path: Path, split: EmbeddedSplit) -> Path:
    arrays: dict[str, np.ndarray] = {"img": split.img, "txt": split.txt}
    if split.labels is not None:
        arrays.update({f"label_{k}": np.asarray(v) for k, v in split.labels.items()})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def evaluate(run_dir: str | Path, cfg: EvalConfig | None = None) -> dict[str, Any]:
    """Evaluate a trained run directory; writes eval JSON, eval_config.yaml, embeddings.npz.

    Returns the flat metrics dict that was written.
    """
    from capgap.models.clip_factory import load_run
    from capgap.models.onednn_linear import use_onednn_linears, wants_onednn

    cfg = cfg or EvalConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(run_dir)
    model, preprocess, tokenizer = load_run(run_dir, device=cfg.device)
    if torch.device(cfg.device).type == "cpu" and wants_onednn(cfg.cpu_matmul):
        use_onednn_linears(model)  # the same embeddings to float32 rounding, ~1.6-1.9x faster
    out, split = evaluate_model(model, preprocess, tokenizer, cfg)
    json_path, npz_path = output_paths(run_dir, cfg)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"run_dir": str(run_dir), "data": cfg.data}
    run_cfg = run_dir / "config.yaml"
    if run_cfg.is_file():
        import yaml

        with open(run_cfg, encoding="utf-8") as fh:
            result["model"] = (yaml.safe_load(fh) or {}).get("model")
    result.update({k: _jsonable(v) for k, v in out.items()})
    if cfg.save_embeddings:
        save_embeddings(npz_path, split)
        result["embeddings"] = npz_path.name
    save_resolved(cfg, json_path.parent, "eval_config.yaml")
    result["config"] = "eval_config.yaml"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    return result


# --- CLI --------------------------------------------------------------------------------------


def _run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="trained run folder (config.yaml + model.safetensors)")


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_command(
        argv, "capgap eval", __doc__, EvalConfig, "eval", arguments=_run_dir_argument
    )
    result = evaluate(args.run_dir, cfg)
    json_path, _ = output_paths(args.run_dir, cfg)
    keys = ["l2m", "rmg", "linear_separability", "i2t_r@1", "t2i_r@1", "zs_acc_object"]
    keys += ["zs_acc_attr_mean", "moad_img", "shift_l2m"]
    summary = ", ".join(f"{k}={result[k]:.3f}" for k in keys if isinstance(result.get(k), float))
    print(f"wrote {json_path}: {summary}")
    for note in result.get("skipped", []):
        print(f"skipped {note}")
    return 0
