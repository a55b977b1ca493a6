"""Config loading: YAML + overrides into dataclasses, strict about keys and types."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest
import yaml

from capgap.core.config import (
    ConfigError,
    add_config_args,
    config_from_args,
    load_config,
    resolve_config_path,
    save_resolved,
)


@dataclass
class Inner:
    lr: float = 1e-3
    name: str = "x"


@dataclass
class Outer:
    epochs: int = 2
    amp: bool = False
    out: str = "runs/a"
    temperature: float | None = None
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def _write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = _write(tmp_path, {"epochs": 5, "inner": {"lr": 0.01}})
    cfg = load_config(Outer, path, ["inner.name=y", "amp=true", "temperature=0.07"])
    assert cfg == Outer(epochs=5, amp=True, temperature=0.07, inner=Inner(lr=0.01, name="y"))


def test_unknown_key_is_named(tmp_path):
    path = _write(tmp_path, {"inner": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"inner\.learning_rate"):
        load_config(Outer, path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("epochs=two", "epochs"),
        ("amp=yes please", "amp"),
        ("amp='true'", "amp"),
        ("inner.lr=[1]", "inner.lr"),
    ],
)
def test_ill_typed_value_is_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Outer, None, [override])


def test_string_booleans_are_rejected_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="amp"):
        load_config(Outer, _write(tmp_path, {"amp": "true"}))


def test_cli_flags_and_set(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_args(parser, Outer, default_config=None)
    args = parser.parse_args(["--epochs", "7", "--amp", "--out", "2024", "--set", "inner.lr=0.5"])
    cfg = config_from_args(Outer, args)
    assert (cfg.epochs, cfg.amp, cfg.out, cfg.inner.lr) == (7, True, "2024", 0.5)
    args = parser.parse_args(["--no_amp"])
    assert config_from_args(Outer, args).amp is False


def test_save_resolved_round_trips(tmp_path):
    cfg = Outer(epochs=3, tags=["a"])
    path = save_resolved(cfg, tmp_path / "run")
    assert load_config(Outer, path) == cfg


def test_packaged_preset_resolves():
    assert resolve_config_path("synth").name == "synth.yaml"
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path("no-such-preset")


def test_exponent_floats_from_the_command_line():
    assert load_config(Outer, None, ["inner.lr=1e-5"]).inner.lr == 1e-5
    parser = argparse.ArgumentParser()
    add_config_args(parser, Outer, default_config=None)
    cfg = config_from_args(Outer, parser.parse_args(["--set", "inner.lr=2E-3"]))
    assert cfg.inner.lr == 2e-3


def test_yaml_mapping_of_kwargs_replaces_its_default_but_sections_merge(tmp_path):
    from capgap.pipeline.train_captioner import TrainCaptionerConfig

    path = tmp_path / "cap.yaml"
    path.write_text(
        "model:\n  timm_architecture: efficientformer_l1\n"
        "  timm_args: {depths: [1, 1], embed_dims: [8, 16]}\n"
    )
    cfg = load_config(TrainCaptionerConfig, str(path))
    # the default XCiT kwargs (img_size, depth, ...) must not leak into EfficientFormer's
    assert cfg.model.timm_args == {"depths": [1, 1], "embed_dims": [8, 16]}
    # the rest of the model section keeps its defaults
    assert cfg.model.decoder_hidden == TrainCaptionerConfig().model.decoder_hidden
