"""capgap train and its Parquet loader: tiny runs on a small synthetic split, offline."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from capgap.core.files import expand_paths
from capgap.models.clip_factory import create_clip, load_run
from capgap.models.optim import lr_at
from capgap.pipeline import synth, train
from capgap.pipeline.parquet_data import ParquetPairs, plan_units
from capgap.pipeline.train import TrainConfig


@pytest.fixture(scope="module")
def seed_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = synth.SynthConfig(out=str(out), split="seed", n=96, shards=3)
    synth.run(cfg, show_progress=False)
    return str(out / "seed" / "*.parquet")


@pytest.fixture(scope="module")
def micro():
    _, preprocess, tokenizer = create_clip("capgap-micro-vit")
    return preprocess, tokenizer


def _uids(dataset: ParquetPairs, num_workers: int) -> list[str]:
    """Every uid the dataset yields in one epoch, through a real DataLoader."""
    dataset.decode = lambda key, uid, image, caption: uid  # skip decoding: we only count rows
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2, 3])
def test_every_row_once_per_epoch_across_workers(seed_split, micro, num_workers):
    ds = ParquetPairs(expand_paths(seed_split), *micro, rows_per_unit=10, shuffle_buffer=8)
    uids = _uids(ds, num_workers)
    assert len(uids) == 96 == ds.num_rows
    assert Counter(uids).most_common(1)[0][1] == 1
    assert sum(ds.rows_per_worker(num_workers)) == 96


def test_shuffle_is_seeded_and_changes_with_epoch(seed_split, micro):
    files = expand_paths(seed_split)
    a = _uids(ParquetPairs(files, *micro, seed=1, rows_per_unit=16), 0)
    b = _uids(ParquetPairs(files, *micro, seed=1, rows_per_unit=16), 0)
    ds = ParquetPairs(files, *micro, seed=1, rows_per_unit=16)
    ds.set_epoch(1)
    c = _uids(ds, 0)
    ordered = _uids(ParquetPairs(files, *micro, shuffle=False), 0)
    assert a == b
    assert a != c and sorted(a) == sorted(c)
    assert ordered == sorted(ordered)


def test_batches_per_epoch_matches_loader(seed_split, micro):
    ds = ParquetPairs(expand_paths(seed_split), *micro, rows_per_unit=10)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=7, num_workers=2, drop_last=True, collate_fn=ds.collate
    )
    batches = list(loader)
    assert len(batches) == ds.batches_per_epoch(7, 2)
    images, texts = batches[0]
    assert images.shape == (7, 3, 32, 32) and texts.shape == (7, 20)


def _write_pairs(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def _png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_caption_mixing_uses_dense_with_probability_p(tmp_path, micro):
    rows = [
        {"uid": f"u{i}", "image": _png(), "caption": "dense", "original_caption": "orig"}
        for i in range(400)
    ]
    _write_pairs(tmp_path / "mix.parquet", rows)
    ds = ParquetPairs([tmp_path / "mix.parquet"], *micro, dense_prob=0.8, seed=3)
    ds.decode = lambda key, uid, image, caption: caption
    captions = Counter(ds)
    assert 0.7 < captions["dense"] / 400 < 0.9
    ds_all = ParquetPairs([tmp_path / "mix.parquet"], *micro, dense_prob=1.0)
    ds_all.decode = lambda key, uid, image, caption: caption
    assert set(ds_all) == {"dense"}


def test_undecodable_row_raises_with_uid(tmp_path, micro):
    rows = [
        {"uid": "good", "image": _png(), "caption": "a"},
        {"uid": "bad-7", "image": b"xx", "caption": "b"},
    ]
    _write_pairs(tmp_path / "bad.parquet", rows)
    ds = ParquetPairs([tmp_path / "bad.parquet"], *micro, shuffle=False)
    with pytest.raises(ValueError, match="bad-7"):
        list(ds)


def test_missing_column_fails_early(tmp_path, micro):
    _write_pairs(tmp_path / "nocap.parquet", [{"uid": "a", "image": _png()}])
    with pytest.raises(ValueError, match="caption"):
        ParquetPairs([tmp_path / "nocap.parquet"], *micro)
    with pytest.raises(FileNotFoundError, match="no Parquet files match"):
        expand_paths(str(tmp_path / "none-*.parquet"))
    assert expand_paths(str(tmp_path)) == [tmp_path / "nocap.parquet"]  # a folder = its shards


def test_plan_units_cuts_row_groups(tmp_path):
    pq.write_table(pa.table({"x": list(range(25))}), tmp_path / "a.parquet", row_group_size=10)
    units = plan_units([tmp_path / "a.parquet"], rows_per_unit=4)
    assert [(u.row_group, u.start, u.stop) for u in units][:4] == [
        (0, 0, 4),
        (0, 4, 8),
        (0, 8, 10),
        (1, 0, 4),
    ]
    assert sum(u.stop - u.start for u in units) == 25


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 20, 1.0, warmup_steps=4) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] < 0.05


def _cfg(data: str, out, **kw) -> TrainConfig:
    base = dict(
        data=data,
        out_dir=str(out),
        epochs=1,
        batch_size=16,
        num_workers=0,
        log_every=2,
        progress=False,
        seed=0,
        threads=1,
    )
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.optim.warmup_steps = 2
    return cfg


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_run_and_resume_continues(seed_split, tmp_path):
    out = train.train(_cfg(seed_split, tmp_path / "run", epochs=1, num_workers=2))
    for name in ("metrics.jsonl", "config.yaml", "model.safetensors"):
        assert (out / name).is_file()
    lines = _lines(out / "metrics.jsonl")
    epochs = [r for r in lines if r["kind"] == "epoch"]
    steps = [r for r in lines if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1] and epochs[0]["samples"] == 96
    assert steps and all({"loss", "contrastive", "lr", "samples_per_s"} <= set(r) for r in steps)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"] == "capgap-micro-vit" and resolved["loss"] == "clip"

    # a second run into the same folder is refused unless resumed or overwritten
    with pytest.raises(FileExistsError):
        train.train(_cfg(seed_split, out, epochs=2))
    train.train(_cfg(seed_split, out, epochs=2, resume=True, num_workers=2))
    epochs = [r for r in _lines(out / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[1]["step"] == 2 * epochs[0]["step"]
    model, _, _ = load_run(out)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [
        "epoch_0001.pt",
        "epoch_0002.pt",
    ]
    ckpt = torch.load(out / "checkpoints" / "epoch_0002.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())


def test_resumed_run_equals_uninterrupted_run(seed_split, tmp_path):
    straight = train.train(_cfg(seed_split, tmp_path / "a", epochs=2))
    # Simulate a crash after epoch 1: a run folder holding only the epoch-1 checkpoint.
    crashed = tmp_path / "b" / "checkpoints"
    crashed.mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "epoch_0001.pt", crashed)
    resumed = train.train(_cfg(seed_split, tmp_path / "b", epochs=2, resume=True))
    a, _, _ = load_run(straight)
    b, _, _ = load_run(resumed)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)


@pytest.mark.parametrize(("loss", "temperature"), [("siglip", None), ("cuaxu", 0.01)])
def test_train_other_losses_log_their_parts(seed_split, tmp_path, loss, temperature):
    out = train.train(_cfg(seed_split, tmp_path / loss, loss=loss, temperature=temperature))
    steps = [r for r in _lines(out / "metrics.jsonl") if r["kind"] == "step"]
    if loss == "cuaxu":
        assert {"uniform", "align", "xuniform"} <= set(steps[-1])
        assert steps[-1]["logit_scale"] == pytest.approx(100.0, rel=1e-4)  # fixed tau = 0.01
    model, _, _ = load_run(out)
    assert (model.logit_bias is not None) == (loss == "siglip")


def test_fine_tune_from_checkpoint_and_cli(seed_split, tmp_path):
    first = train.train(_cfg(seed_split, tmp_path / "first"))
    code = train.main(
        [
            "--data",
            seed_split,
            "--out_dir",
            str(tmp_path / "ft"),
            "--epochs",
            "1",
            "--batch_size",
            "16",
            "--num_workers",
            "0",
            "--no_progress",
            "--threads",
            "1",
            "--pretrained",
            str(first / "model.safetensors"),
            "--lr",
            "0.00001",
            "--set",
            "optim.warmup_steps=1",
        ]
    )
    assert code == 0
    resolved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert resolved["pretrained"].endswith("model.safetensors") and resolved["lr"] == 1e-5


def test_bad_config_is_rejected():
    with pytest.raises(SystemExit, match="unknown config key"):
        train.main(["--set", "optim.nope=1"])
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)


def test_collate_tokenises_the_batch_like_row_by_row(seed_split, micro):
    ds = ParquetPairs(expand_paths(seed_split), *micro, shuffle=False)
    rows = [pair for pair, _ in zip(ds, range(5), strict=False)]
    images, tokens = ds.collate(rows)
    assert images.shape == (5, 3, 32, 32)
    expected = torch.stack([micro[1]([caption])[0] for _, caption in rows])
    assert torch.equal(tokens, expected)


def test_decoded_cache_gives_the_same_batches_without_decoding_again(seed_split, micro):
    files = expand_paths(seed_split)
    plain = ParquetPairs(files, *micro, seed=2, rows_per_unit=16)
    cached = ParquetPairs(files, *micro, seed=2, rows_per_unit=16, cache_decoded=True)
    opened = []
    transform = cached.transform
    cached.transform = lambda img: opened.append(1) or transform(img)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        rows_a, rows_b = list(plain), list(cached)
        for (img_a, cap_a), (img_b, cap_b) in zip(rows_a, rows_b, strict=True):
            assert cap_a == cap_b and torch.equal(img_a, img_b)
        assert len(opened) == plain.num_rows  # epoch 2 decoded nothing
        for start in range(0, len(rows_a), 7):  # the token cache gives the tokenizer's ids
            a, b = (
                plain.collate(rows_a[start : start + 7]),
                cached.collate(rows_b[start : start + 7]),
            )
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="cache_decoded needs num_workers 0"):
        TrainConfig(num_workers=2, data_opts=train.DataConfig(cache_decoded=True))
