"""Safe loading: no pickled code runs, no remote code runs unasked, no image read outside its root.

A pickled payload whose ``__reduce__`` would create a marker file is saved with
``torch.save`` under every checkpoint suffix; loading it through
``capgap.models.clip_factory`` must be refused and the marker never written (a
control test proves the payload does write it when unpickled unsafely). A local
transformers checkpoint whose config ships its own code (``auto_map``) must be
refused by the captioner unless ``trust_remote_code`` is set. Image paths are
confined to their root (``..``, absolute paths, symlinks out, other URL schemes).

    .venv/bin/python -m pytest -q tests/test_safe_loading.py
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from capgap.models import clip_factory
from capgap.models.captioner import CaptionerConfig, HFCaptioner
from capgap.transforms.decode import read_image_file, resolve_image_path
from capgap.transforms.reasons import Reason, RecordError

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("models", "pipeline", "transforms")


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(path: Path, marker: Path, wrapped: bool = True) -> Path:
    payload = _Payload(marker)
    state = {"state_dict": {"weight": torch.zeros(2), "evil": payload}} if wrapped else payload
    torch.save(state, path)
    assert not marker.exists()
    return path


def test_control_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """Without weights_only the payload does write its marker: the tests below can fail."""
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "model.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["in-state-dict", "bare"])
def test_load_state_dict_refuses_pickled_code(tmp_path, suffix, wrapped):
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / f"model{suffix}", marker, wrapped)
    with pytest.raises(pickle.UnpicklingError):
        clip_factory.load_state_dict(path)
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_create_clip_refuses_pickled_checkpoint(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / f"model{suffix}", marker)
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, the marker decides
        clip_factory.create_clip("capgap-micro-vit", str(path))
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "model.safetensors", marker)
    with pytest.raises(Exception):  # noqa: B017
        clip_factory.load_state_dict(path)
    assert not marker.exists()


def test_load_run_refuses_pickled_weights(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: capgap-micro-vit\n")
    _evil_checkpoint(run / "model.safetensors", marker)
    with pytest.raises(Exception):  # noqa: B017
        clip_factory.load_run(run)
    assert not marker.exists()


def test_safe_checkpoints_still_load(tmp_path):
    """The refusals are not blanket: safetensors and plain tensor state dicts load."""
    torch.manual_seed(0)
    model, _, _ = clip_factory.create_clip("capgap-micro-vit")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    st_path = clip_factory.save_checkpoint(model, tmp_path / "model.safetensors")
    pt_path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.items()}}, pt_path)
    for path in (st_path, pt_path):
        loaded, _, _ = clip_factory.create_clip("capgap-micro-vit", str(path))
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, reference[key]), (path.name, key)


def _calls(source_dirs=SOURCE_DIRS):
    for folder in source_dirs:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    yield path.relative_to(REPO), node


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_no_unsafe_deserialisation_in_the_code():
    """Every torch.load passes weights_only=True; no pickle / yaml.load / remote code on."""
    problems = []
    for path, call in _calls():
        name = _name(call.func)
        kwargs = {k.arg: k.value for k in call.keywords if k.arg}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kwargs:
            value = kwargs.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{path}:{call.lineno} {name} without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "yaml.load"):
            problems.append(f"{path}:{call.lineno} {name}")
        value = kwargs.get("trust_remote_code")
        if isinstance(value, ast.Constant) and value.value is True:
            problems.append(f"{path}:{call.lineno} trust_remote_code=True hard-coded")
        passes_kwargs = any(k.arg is None for k in call.keywords)  # **kwargs may carry it
        if (
            name.endswith("from_pretrained")
            and "trust_remote_code" not in kwargs
            and not passes_kwargs
        ):
            problems.append(f"{path}:{call.lineno} {name} without trust_remote_code")
    assert not problems, "\n".join(problems)


# --- transformers remote code -----------------------------------------------------------------


def _remote_code_checkpoint(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "capgap_evil_vlm",
                "architectures": ["EvilModel"],
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForImageTextToText": "modeling_evil.EvilModel",
                },
            }
        )
    )
    code = (
        f"open({str(marker)!r}, 'w').write('remote code ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'capgap_evil_vlm'\n"
    )
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    return folder


def test_captioner_refuses_remote_code_by_default(tmp_path):
    marker = tmp_path / "pwned"
    folder = _remote_code_checkpoint(tmp_path / "evil", marker)
    cfg = CaptionerConfig(model=str(folder))
    assert cfg.trust_remote_code is False
    with pytest.raises(ValueError, match="(?i)trust_remote_code|custom code"):
        HFCaptioner(cfg)
    assert not marker.exists(), "the checkpoint's own code ran without trust_remote_code"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flag", [False, True])
def test_captioner_passes_the_trust_flag(tmp_path, monkeypatch, flag):
    """trust_remote_code reaches transformers exactly as configured (the opt-in works)."""
    import transformers

    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with pytest.raises(_Stop):
        HFCaptioner(CaptionerConfig(model=str(folder), trust_remote_code=flag))
    assert seen["trust_remote_code"] is flag
    assert seen["local_files_only"] is True


def test_curate_recaption_defaults_to_no_remote_code():
    from capgap.core.config import from_dict
    from capgap.transforms.recaption import RecaptionConfig

    cfg = from_dict(RecaptionConfig, {}, prefix="recaption.stage.")
    assert cfg.captioner.trust_remote_code is False
    on = from_dict(RecaptionConfig, {"captioner": {"trust_remote_code": True}}, prefix="x.")
    assert on.captioner.trust_remote_code is True


# --- image paths ------------------------------------------------------------------------------


@pytest.fixture()
def image_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(b"png")
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "x.png").write_bytes(b"secret")
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", root / "out_link.png")
    os.symlink(root / "sub" / "ok.png", root / "in_link.png")
    os.symlink("/dev/zero", root / "zero_link")
    os.mkfifo(root / "fifo.png")
    return root


@pytest.mark.parametrize(
    "path",
    [
        "../secret.png",
        "sub/../../secret.png",
        "../root2/x.png",  # a sibling whose name starts with the root's
        "out_link.png",
        "zero_link",
        "/etc/passwd",
        "file:///etc/passwd",
        "gs://bucket/x.png",
        "https://example.com/x.png",
    ],
)
def test_paths_outside_the_root_are_refused(image_root, path):
    with pytest.raises(RecordError) as info:
        resolve_image_path(path, str(image_root))
    assert info.value.reason == Reason.PATH_OUTSIDE_ROOT


@pytest.mark.parametrize("path", ["", "   ", "a\x00b.png", None, 3, b"sub/ok.png"])
def test_invalid_paths_are_refused(image_root, path):
    with pytest.raises(RecordError) as info:
        resolve_image_path(path, str(image_root))
    assert info.value.reason == Reason.PATH_INVALID


@pytest.mark.parametrize("path", ["sub/ok.png", "./sub/ok.png", "in_link.png", " sub/ok.png "])
def test_paths_inside_the_root_resolve(image_root, path):
    full = resolve_image_path(path, str(image_root))
    assert full.startswith(os.path.realpath(image_root) + os.sep)
    assert read_image_file(full, 100) == b"png"


def test_remote_root_confines_paths():
    root = "gs://bucket/images"
    assert resolve_image_path("a/b.png", root) == "gs://bucket/images/a/b.png"
    for path in ("../other/x.png", "gs://bucket/images2/x.png", "gs://other/images/x.png"):
        with pytest.raises(RecordError) as info:
            resolve_image_path(path, root)
        assert info.value.reason == Reason.PATH_OUTSIDE_ROOT


def test_special_files_inside_the_root_are_not_read(image_root):
    """A FIFO (would block) or a directory inside the root is refused, not opened."""
    for name in ("fifo.png", "sub"):
        full = resolve_image_path(name, str(image_root))
        with pytest.raises(RecordError) as info:
            read_image_file(full, 100)
        assert info.value.reason == Reason.PATH_UNREADABLE
    with pytest.raises(RecordError) as info:
        read_image_file(resolve_image_path("missing.png", str(image_root)), 100)
    assert info.value.reason == Reason.PATH_MISSING
