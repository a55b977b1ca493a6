"""`capgap eval` end to end: a tiny random CLIP on a tiny synthetic split."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from capgap.core import world
from capgap.core.config import ConfigError, load_config
from capgap.models import metrics, zero_shot
from capgap.models.clip_factory import create_clip, save_checkpoint
from capgap.pipeline import evaluate as ev
from capgap.pipeline.synth import SplitConfig, SynthConfig
from capgap.pipeline.synth import run as synth_run


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(out=str(out), split="test", n=40, shards=2)
    synth_run(cfg, show_progress=False)
    return out / "test"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model, _, _ = create_clip("capgap-micro-vit")
    save_checkpoint(model, run / "model.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "capgap-micro-vit"}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0}) + "\n")
    return run


def _cfg(data, **overrides):
    cfg = load_config(ev.EvalConfig, "eval", values={"data": str(data), "progress": False})
    cfg.robustness.sigmas = [0.1, 0.5]
    cfg.robustness.n_trials = 1
    cfg.ablate_ks = [1, 4]
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_eval_end_to_end(run_dir, split_dir, tmp_path):
    out_json = tmp_path / "res" / "eval.json"
    cfg = _cfg(split_dir / "*.parquet", out=str(out_json))
    result = ev.evaluate(run_dir, cfg)
    written = json.loads(out_json.read_text())
    assert written == result
    assert written["n_pairs"] == 40 and written["model"] == "capgap-micro-vit"
    assert written["skipped"] == []
    for key in (
        "l2m",
        "l2i",
        "rmg",
        "linear_separability",
        "uniformity_img",
        "cone_txt",
        "alignment",
        "i2t_r@1",
        "t2i_r@10",
        "ablate4_l2m",
        "moad_img",
        "moad_txt",
        "zs_acc_object",
        "zs_acc_colour",
        "zs_acc_texture",
        "zs_acc_attr_mean",
        "zs_object_clean_acc",
        "shift_zs_object_clean_acc",
        "zs_mean_flip_noise0.5",
        "shift_zs_mean_flip_noise0.5",
        "i2t_flip_int8",
        "shift_t2i_flip_int4",
        "shift_l2m",
    ):
        assert isinstance(written[key], float), key
    # every value is JSON-plain and flat
    assert all(not isinstance(v, dict) for v in written.values())
    assert 0.0 <= written["zs_acc_object"] <= 1.0
    assert written["zs_acc_object"] == written["zs_object_clean_acc"]
    assert written["robustness_sigmas"] == [0.1, 0.5]
    # saved embeddings reproduce the metrics
    npz = np.load(out_json.parent / "embeddings.npz")
    assert npz["img"].shape == (40, 64) and list(npz["label_object"][:1])
    assert metrics.l2m(npz["img"], npz["txt"]) == pytest.approx(written["l2m"], rel=1e-5)
    resolved = yaml.safe_load((out_json.parent / "eval_config.yaml").read_text())
    assert resolved["robustness"]["sigmas"] == [0.1, 0.5]
    # the run's own config is untouched
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {"model": "capgap-micro-vit"}


def test_eval_without_labels_skips_zero_shot_and_moad(run_dir, split_dir, tmp_path):
    table = pq.read_table(
        sorted(split_dir.glob("*.parquet"))[0], columns=["uid", "image", "caption"]
    )
    pq.write_table(table, tmp_path / "nolabels.parquet")
    cfg = _cfg(
        tmp_path / "nolabels.parquet", out=str(tmp_path / "eval.json"), save_embeddings=False
    )
    result = ev.evaluate(run_dir, cfg)
    assert any("zero_shot" in s for s in result["skipped"])
    assert any("moad" in s for s in result["skipped"])
    assert not any(k.startswith(("zs_", "moad")) for k in result)
    assert isinstance(result["i2t_flip_noise0.1"], float)
    assert not (tmp_path / "embeddings.npz").exists()


def test_cli_writes_next_to_run(run_dir, split_dir, capsys):
    code = ev.main(
        [
            str(run_dir),
            "--data",
            str(split_dir / "*.parquet"),
            "--no_progress",
            "--max_samples",
            "12",
            "--set",
            "robustness.sigmas=[0.2]",
            "--set",
            "robustness.bits=[4]",
        ]
    )
    assert code == 0
    written = json.loads((run_dir / "eval.json").read_text())
    assert written["n_pairs"] == 12
    assert "shift_i2t_flip_noise0.2" in written and "i2t_flip_int4" in written
    assert "wrote" in capsys.readouterr().out


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(ev.EvalConfig, "eval", ["robustness.sigma=[0.1]"])
    with pytest.raises(ConfigError, match="sigmas"):
        load_config(ev.EvalConfig, "eval", ["robustness.sigmas=[-1]"])
    with pytest.raises(ConfigError, match="mode"):
        load_config(ev.EvalConfig, "eval", ["robustness.mode=rotate"])
    with pytest.raises(ConfigError, match="cpu_matmul"):
        load_config(ev.EvalConfig, "eval", ["cpu_matmul=mkl"])


def test_onednn_linears_give_the_same_metrics(run_dir, split_dir, tmp_path):
    results = {
        choice: ev.evaluate(
            run_dir, _cfg(split_dir / "*.parquet", out=str(tmp_path / choice / "eval.json"),
                          cpu_matmul=choice, save_embeddings=False)
        )
        for choice in ("torch", "auto")
    }  # fmt: skip
    for key in ("l2m", "rmg", "i2t_r@1", "zs_acc_object"):
        assert results["auto"][key] == pytest.approx(results["torch"][key], abs=1e-4), key


def test_missing_caption_column_fails(split_dir, tmp_path):
    table = pq.read_table(sorted(split_dir.glob("*.parquet"))[0], columns=["uid", "image"])
    pq.write_table(table, tmp_path / "nocap.parquet")
    with pytest.raises(ValueError, match="caption"):
        ev.read_pairs(str(tmp_path / "nocap.parquet"), ev.EvalConfig())


# --- zero-shot prompts and classifiers (capgap.models.zero_shot) -----------------------------


def test_expand_template_fields():
    assert zero_shot.expand_template("a {}", "circle") == ["a circle"]
    prompts = zero_shot.expand_template("a {} {object}", "red")
    assert prompts[:2] == ["a red circle", "a red square"] and len(prompts) == 8
    assert len(zero_shot.expand_template("a {size} {colour} {}", "star")) == 3 * 8
    with pytest.raises(ValueError, match="unknown field"):
        zero_shot.expand_template("a {shape} {}", "red")


def test_classifier_weights_average_per_template_then_over_templates():
    words = ["red", "blue", *world.OBJECTS]

    def encode(prompts):  # bag of known words, one axis each
        return np.array([[float(w in p.split()) for w in words] for p in prompts])

    w = zero_shot.classifier_weights(encode, ["red", "blue"], ["a {}", "a {} {object}"])
    # template 1 gives e_red; template 2 averages (e_red + e_obj)/sqrt2 over 8 objects and
    # renormalises: (e_red + sum_obj e_obj / 8) / sqrt(1.125). Their mean, renormalised:
    ratio = w[0, 0] / w[0, 2]  # red axis over one object axis
    assert ratio == pytest.approx(8 * np.sqrt(1.125) + 8)
    assert np.allclose(np.linalg.norm(w, axis=1), 1.0)
    assert w[0, 1] == 0.0 and w[1, 0] == 0.0


def test_zero_shot_accuracies_by_hand():
    weights = {"colour": np.eye(8)[:8], "object": np.eye(8)}
    img = np.eye(8)[[0, 1, 2, 2]]
    labels = {
        "colour": ["red", "green", "blue", "red"],
        "object": ["circle", "square", "circle", "triangle"],
    }
    out = zero_shot.zero_shot_accuracies(img, labels, weights)
    assert out["zs_acc_colour"] == pytest.approx(0.75)
    assert out["zs_acc_object"] == pytest.approx(0.75)
    assert out["zs_acc_attr_mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="not a colour"):
        zero_shot.label_indices("colour", ["mauve"])


def test_mean_shift_fitted_on_held_out_pairs(run_dir, split_dir, tmp_path_factory):
    """Both protocols: shift_* fitted on the evaluated pairs, heldout_shift_* on other pairs
    of the same distribution (Chowers et al.); fitting on the evaluated pairs themselves
    through the held-out path reproduces shift_* exactly."""
    held_out = tmp_path_factory.mktemp("held")
    synth_run(SynthConfig(out=str(held_out), split="test", n=30, seed=7), show_progress=False)
    cfg = _cfg(split_dir / "*.parquet")
    cfg.robustness.shift_fit_data = str(held_out / "test" / "*.parquet")
    result = ev.evaluate(run_dir, cfg)
    assert result["heldout_shift_fit_pairs"] == 30
    for key in (
        "heldout_shift_l2m",
        "heldout_shift_zs_mean_flip_noise0.5",
        "heldout_shift_i2t_flip_int8",
    ):
        assert isinstance(result[key], float), key
    assert result["heldout_shift_l2m"] != result["shift_l2m"]  # another fit set, another shift
    cfg.robustness.shift_fit_data = str(split_dir / "*.parquet")
    same = ev.evaluate(run_dir, cfg)
    assert same["heldout_shift_l2m"] == pytest.approx(same["shift_l2m"])
    assert same["heldout_shift_zs_mean_flip_noise0.5"] == same["shift_zs_mean_flip_noise0.5"]


def test_views_measure_the_same_images_with_other_captions(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewed")
    split = SplitConfig(n=40, terse_k_weights=[0.2, 0.3, 0.25, 0.15, 0.1, 0.0])
    synth_run(SynthConfig(out=str(out), split="test", n=40, splits={"test": split}), False)
    cfg = _cfg(out / "test" / "*.parquet")
    cfg.views = {"terse": "caption_terse", "nothing": "no_such_column"}
    result = ev.evaluate(run_dir, cfg)
    for key in ("terse_l2m", "terse_rmg", "terse_linear_separability", "terse_i2t_r@1"):
        assert isinstance(result[key], float), key
    assert result["terse_l2m"] != result["l2m"]  # other captions, same images
    assert result["skipped"] == ["view nothing: no column 'no_such_column' in " + cfg.data]
    cfg.caption_column, cfg.views = "caption_terse", {}
    direct = ev.evaluate(run_dir, cfg)  # the view equals evaluating that column directly
    assert direct["l2m"] == pytest.approx(result["terse_l2m"])
    assert direct["i2t_r@1"] == result["terse_i2t_r@1"]
