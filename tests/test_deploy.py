"""Deployment files (docker/): the worker image and the Flex Template launcher pin what this
checkout runs with, and every template parameter is a flag ``capgap curate`` takes.

Nothing here builds an image or talks to GCP (the project's machine can do neither); it
reads the files and runs the parser and the launcher with a stub graph on the DirectRunner.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import runpy
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from capgap.pipeline import curate

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "docker" / "Dockerfile"
LAUNCHER = ROOT / "docker" / "flex_template" / "Dockerfile"
METADATA = ROOT / "docker" / "flex_template" / "metadata.json"
LAUNCH_PY = ROOT / "docker" / "flex_template" / "launch.py"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def dockerfile(path: Path) -> dict:
    """ARG defaults, FROM images, COPY sources, ENV and ENTRYPOINT of a Dockerfile."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out: dict = {"args": {}, "from": [], "copy": [], "env": {}, "entrypoint": None, "run": []}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out["args"].setdefault(name, value)
        elif word == "FROM":
            out["from"].append(rest.split()[0])
        elif word == "COPY":
            out["copy"].append(rest.split()[:-1])
        elif word == "ENV":
            name, value = rest.split("=", 1)
            out["env"][name] = value
        elif word == "ENTRYPOINT":
            out["entrypoint"] = json.loads(rest)
        elif word == "RUN":
            out["run"].append(rest)
    return out


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)


def setup_pins() -> dict[str, SpecifierSet]:
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    block = re.search(r"REQUIRES = \[(.*?)\]", text, re.S).group(1)
    pins = {}
    for requirement in re.findall(r'"([^"]+)"', block):
        name, spec = re.match(r"([A-Za-z0-9_.\-\[\]]+)(.*)", requirement).groups()
        pins[name] = SpecifierSet(spec)
    return pins


@pytest.fixture(scope="module")
def worker() -> dict:
    return dockerfile(WORKER)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return dockerfile(LAUNCHER)


def test_worker_image_is_the_beam_sdk_image_of_this_checkout(worker):
    beam_version = importlib.metadata.version("apache-beam")
    assert worker["args"]["BEAM_VERSION"] == beam_version
    assert setup_pins()["apache-beam"].contains(beam_version)
    assert [expand(image, worker["args"]) for image in worker["from"]] == [
        f"apache/beam_python{PY}_sdk:{beam_version}"
    ]
    assert worker["entrypoint"] == ["/opt/apache/beam/boot"]


def test_worker_image_torch_satisfies_setup_pins(worker):
    pins = setup_pins()
    args = worker["args"]
    assert pins["torch"].contains(args["TORCH_VERSION"]), (args["TORCH_VERSION"], pins["torch"])
    assert pins["torchvision"].contains(args["TORCHVISION_VERSION"])
    assert re.fullmatch(r"cu\d{3}", args["CUDA"]), args["CUDA"]
    index = expand(args["TORCH_INDEX_URL"], args)
    assert index == f"https://download.pytorch.org/whl/{args['CUDA']}"
    # the CUDA wheels are installed from that index, at the pinned versions
    assert any("--index-url" in run and "torch==${TORCH_VERSION}" in run for run in worker["run"])
    # same release line as the torch this checkout is tested with
    installed = Version(importlib.metadata.version("torch")).release[:2]
    assert Version(args["TORCH_VERSION"]).release[:2] == installed


def test_images_install_capgap_from_the_sdist(worker, launcher):
    for image in (worker, launcher):
        assert ["dist/capgap-*.tar.gz"] in image["copy"]
        assert any("pip install" in run and "capgap-*.tar.gz" in run for run in image["run"])
        assert any("apache-beam[gcp]==${BEAM_VERSION}" in run for run in image["run"])


def test_launcher_image_matches_the_worker_image(worker, launcher):
    assert launcher["args"]["BEAM_VERSION"] == worker["args"]["BEAM_VERSION"]
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        assert launcher["args"][name] == worker["args"][name]
    minor = PY.replace(".", "")
    assert launcher["from"] == [
        f"gcr.io/dataflow-templates-base/python{minor}-template-launcher-base"
    ]
    assert launcher["env"]["FLEX_TEMPLATE_PYTHON_PY_FILE"] == "/template/launch.py"
    assert launcher["env"]["FLEX_TEMPLATE_PYTHON_SETUP_FILE"] == "/template/setup.py"
    assert ["docker/flex_template/launch.py"] in launcher["copy"]
    assert (ROOT / launcher["args"]["CURATE_CONFIG"]).is_file()
    assert launcher["entrypoint"] is None  # the base image's template launcher stays


def test_worker_image_matches_the_dataflow_preset():
    preset = (ROOT / "configs" / "runners" / "dataflow.yaml").read_text(encoding="utf-8")
    image = re.search(r"sdk_container_image:\s*(\S+)", preset).group(1)
    assert image.endswith("/capgap/beam-torch-gpu:latest"), image
    assert "beam-torch-gpu:latest" in WORKER.read_text(encoding="utf-8")


def test_dockerignore_keeps_the_venv_out_and_the_sdist_in():
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "runs", "data", "out", "build", "demo_out"} <= patterns
    assert not patterns & {"dist", "docker", "configs", "*"}


# --- Flex Template parameters ----------------------------------------------------------------

# A plausible value per template parameter, and what it must set in the resolved config.
SAMPLES = {
    "input": ("gs://b/shards/*.tar", lambda cfg: cfg.input == "gs://b/shards/*.tar"),
    "output": ("gs://b/curated/daily", lambda cfg: cfg.output == "gs://b/curated/daily"),
    "reference": (
        "/opt/capgap/reference",
        lambda cfg: cfg.model_config().run_dir == "/opt/capgap/reference",
    ),
    "device": ("cuda", lambda cfg: cfg.model_config().device == "cuda"),
    "num_shards": ("4", lambda cfg: cfg.num_shards == 4),
    "cache": ("gs://b/cache", lambda cfg: cfg.cache == "gs://b/cache"),
    "previous": ("gs://b/curated/prev", lambda cfg: cfg.previous == "gs://b/curated/prev"),
    "config": (None, lambda cfg: cfg.decide.drop.value == 0.125),  # a YAML, made below
    "set": ("decide.drop.value=0.3", lambda cfg: cfg.decide.drop.value == 0.3),
}


@pytest.fixture(scope="module")
def parameters() -> list[dict]:
    data = json.loads(METADATA.read_text(encoding="utf-8"))
    assert data["name"] and data["description"]
    return data["parameters"]


def test_metadata_parameters_are_curate_flags(parameters):
    parser = argparse.ArgumentParser()
    curate.CurateOptions._add_argparse_args(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    names = [p["name"] for p in parameters]
    assert len(names) == len(set(names))
    assert {f"--{name}" for name in names} <= flags
    assert set(names) == set(SAMPLES), "give each new parameter a sample in SAMPLES"
    for param in parameters:
        assert {"name", "label", "helpText", "regexes"} <= set(param)
        assert param["isOptional"] is (param["name"] not in ("input", "output"))
        for regex in param["regexes"]:
            re.compile(regex)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_metadata_parameter_lands_in_the_config(parameters, name, tmp_path):
    value, check = SAMPLES[name]
    if name == "config":
        path = tmp_path / "scheduled.yaml"
        path.write_text("decide:\n  drop:\n    value: 0.125\n", encoding="utf-8")
        value = str(path)
    param = next(p for p in parameters if p["name"] == name)
    for regex in param["regexes"]:
        assert re.match(regex, value), (name, value, regex)
    cfg, _ = curate.parse(["--input", "x", "--output", "y", f"--{name}={value}"])
    assert check(cfg), (name, value)


def test_set_parameter_can_allow_overwriting_the_previous_build(parameters):
    regex = next(p for p in parameters if p["name"] == "set")["regexes"][0]
    assert re.match(regex, "overwrite=true")
    assert not re.match(regex, "overwrite=true,decide.drop.value=0.3")  # one override only
    cfg, _ = curate.parse(["--input", "x", "--output", "y", "--set=overwrite=true"])
    assert cfg.overwrite is True


def test_packaged_preset_is_a_valid_config_value(parameters):
    regex = next(p for p in parameters if p["name"] == "config")["regexes"][0]
    assert re.match(regex, "curate") and not re.match(regex, "gs://b/curate.yaml")
    curate.parse(["--input", "x", "--output", "y", "--config=curate"])


# --- launch.py -------------------------------------------------------------------------------


@pytest.fixture
def launch():
    namespace = runpy.run_path(str(LAUNCH_PY), run_name="capgap_flex_launch")
    return namespace["launch"]


def test_launch_py_imports_without_running(launch):
    assert callable(launch)


def test_launch_builds_and_submits_without_waiting(launch, monkeypatch, tmp_path):
    seen = {}

    def fake_build(p, cfg, started=None):
        seen["cfg"] = cfg
        _ = p | beam.Create([1])

    class Submitted:
        def wait_until_finish(self, duration=None):
            raise AssertionError("a Flex Template launch must not wait for the job")

    def submit(p):
        seen["submitted"] = seen.get("submitted", 0) + 1
        return Submitted()

    monkeypatch.setattr(curate, "build", fake_build)
    monkeypatch.setattr(beam.Pipeline, "run", submit)
    out = tmp_path / "out"
    argv = ["--runner=DirectRunner", "--input=gs://b/x/*.tar", f"--output={out}"]
    assert launch([*argv, "--set=decide.drop.value=0.3"]) == 0
    assert seen["cfg"].decide.drop.value == 0.3 and seen["submitted"] == 1

    (out / "manifest.json").parent.mkdir(parents=True)
    (out / "manifest.json").write_text("{}", encoding="utf-8")
    assert launch(argv) == 2  # a finished build is not replaced without overwrite
    assert launch([*argv, "--set=overwrite=true"]) == 0
    assert launch(["--runner=DirectRunner", f"--output={out}"]) == 2  # no input
    assert seen["submitted"] == 2
