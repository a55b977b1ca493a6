"""The cache and model changes: a new captioner recomputes captions (not embeddings), a new
CLIP run recomputes embeddings and gate scores (not captions); a rerun recomputes nothing.

Recaptioning with a tiny random-init captioner in the embedded architecture (saved with
``save_pretrained``, loaded like any Hugging Face captioner) and the quality gate on; the
scoring CLIP and the gate's CLIP are the same ``capgap train``-style run folder.

    .venv/bin/python -m pytest -q tests/test_cache_models.py
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from cluster_compare import cluster_check

from capgap.models import tiny_captioner as tc
from capgap.models.clip_factory import create_clip, save_checkpoint
from capgap.pipeline import curate
from capgap.pipeline.synth import SCHEMA, SplitConfig, make_row

N = 12


def clip_run(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model, _, _ = create_clip("capgap-micro-vit")
    folder.mkdir()
    save_checkpoint(model, folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "capgap-micro-vit"}))
    return folder


def captioner_dir(folder: Path) -> Path:
    torch.manual_seed(0)
    spec = tc.TinyCaptionerSpec(
        encoder="vit", patch_size=8, encoder_hidden=32, encoder_layers=1, encoder_heads=2,
        encoder_mlp=64, decoder_hidden=32, decoder_layers=1, decoder_heads=2, max_length=16,
        image_size=32,
    )  # fmt: skip
    tok = tc.build_tokenizer()
    return tc.save_captioner(tc.build_model(spec, tok), tok, tc.build_image_processor(32), folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    split = SplitConfig(n=N, k_weights=[0.2, 0.3, 0.2, 0.2, 0.1, 0.0], mismatch_rate=0.2)
    rows = [make_row(i, "web", split, 0, 32, 0.05) for i in range(N)]
    (root / "in").mkdir()
    for s in range(2):
        table = pa.Table.from_pylist(rows[s * N // 2 : (s + 1) * N // 2], schema=SCHEMA)
        pq.write_table(table, root / "in" / f"web-{s}.parquet")
    return {
        "root": root,
        "a": clip_run(root / "clip-a", 0),
        "b": clip_run(root / "clip-b", 1),
        "captioner": captioner_dir(root / "captioner"),
    }


def build(world, name: str, clip: Path, *extra: str) -> dict:
    sets = [
        "score.bank_size=4",
        "model.min_batch_size=4",
        "model.max_batch_size=8",
        "decide.drop.mode=off",
        "decide.recaption.mode=absolute",
        "decide.recaption.value=-1",  # every row: imbalance > -1
        "recaption.enabled=true",
        f"recaption.stage.captioner.model={world['captioner']}",
        "recaption.stage.captioner.max_new_tokens=6",
        "recaption.stage.gate.enabled=true",
        f"recaption.stage.gate.clip_run={clip}",
        *extra,
    ]
    argv = ["--input", str(world["root"] / "in" / "*.parquet")]
    argv += ["--output", str(world["root"] / name), "--reference", str(clip)]
    argv += ["--cache", str(world["root"] / "cache")]
    return curate.run(argv + [f"--set={s}" for s in sets])


def stages(manifest: dict) -> dict[str, dict[str, int]]:
    return manifest["cache"]["stages"]


@pytest.fixture(scope="module")
def runs(world):
    out = {"first": build(world, "first", world["a"])}
    out["rerun"] = build(world, "rerun", world["a"])
    out["captioner"] = build(
        world, "new-captioner", world["a"], "recaption.stage.captioner.max_new_tokens=4"
    )
    out["clip"] = build(world, "new-clip", world["b"])
    return out


def test_first_build_computes_everything(runs):
    first = stages(runs["first"])
    recaptioned = runs["first"]["counts"]["curated_by_decision"]["recaption"]
    assert recaptioned == N
    assert first["embed"] == {"hit": 0, "miss": N}
    assert first["caption"] == {"hit": 0, "miss": recaptioned}
    assert first["gate"] == {"hit": 0, "miss": recaptioned}


def test_rerun_computes_no_embedding_caption_or_gate_score(runs, world):
    rerun = stages(runs["rerun"])
    assert all(counts["miss"] == 0 for counts in rerun.values()), rerun
    assert runs["rerun"]["metrics"].get("cache.caption.miss", 0) == 0
    assert runs["rerun"]["counts"] == runs["first"]["counts"]
    a = cluster_check.rows_of(world["root"] / "first")
    b = cluster_check.rows_of(world["root"] / "rerun")
    assert cluster_check.same_rows(a["curated"], b["curated"])
    for uid, row in a["curated"].items():  # captions and gate scores exactly as computed
        other = b["curated"][uid]
        assert (row["caption"], row["recaption_status"]) == (
            other["caption"],
            other["recaption_status"],
        )
        assert row["gate_clip_score_new"] == other["gate_clip_score_new"]


def test_new_captioner_settings_recompute_captions_not_embeddings(runs):
    changed = stages(runs["captioner"])
    recaptioned = runs["captioner"]["counts"]["curated_by_decision"]["recaption"]
    assert changed["embed"] == {"hit": N, "miss": 0}
    assert changed["caption"] == {"hit": 0, "miss": recaptioned}
    spaces = runs["captioner"]["cache"]["spaces"]
    assert (
        spaces["caption"]["fingerprint"]
        != runs["first"]["cache"]["spaces"]["caption"]["fingerprint"]
    )
    assert spaces["embed"] == runs["first"]["cache"]["spaces"]["embed"]


def test_new_clip_recomputes_embeddings_and_gate_scores_not_captions(runs):
    changed = stages(runs["clip"])
    recaptioned = runs["clip"]["counts"]["curated_by_decision"]["recaption"]
    assert changed["embed"] == {"hit": 0, "miss": N}
    assert changed["caption"] == {"hit": recaptioned, "miss": 0}
    assert changed["gate"] == {"hit": 0, "miss": recaptioned}
