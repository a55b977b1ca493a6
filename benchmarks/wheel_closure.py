"""Check a folder of wheels for the GPU machine: every requirement met, total under 64 MiB.

The GPU machine (Python 3.12, x86-64 Linux) reaches no package registry; ``gpu_check.sh``
installs ``.whl/*.whl`` there with ``--no-deps``. This reads each wheel's ``Requires-Dist``
(markers evaluated for CPython 3.12 on Linux, no extras) and fails when a requirement is
neither one of the wheels nor a package that machine already has (``GPU_MACHINE``: the
image's package list as /work/.library/device/KINDS.md recorded it on 2026-11-17).

    python benchmarks/wheel_closure.py .whl
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

LIMIT_MIB = 64.0
# The Python packages of the GPU machine's image (KINDS.md), the ones beam, open_clip,
# datasets and capgap can lean on.
_GPU_MACHINE_LIST = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    certifi charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools
    frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx huggingface-hub idna imageio
    jinja2 joblib kiwisolver markupsafe matplotlib msgpack multidict networkx numpy packaging
    pandas pillow pip pluggy protobuf psutil pyarrow pyparsing python-dateutil
    pyyaml regex requests rich safetensors scikit-learn scipy setuptools six sortedcontainers
    sympy threadpoolctl timm tokenizers torch torchvision tqdm transformers triton
    typing-extensions typing-inspect urllib3 wheel wrapt xxhash yarl zipp
"""
GPU_MACHINE = frozenset(canonicalize_name(name) for name in _GPU_MACHINE_LIST.split())
# The versions KINDS.md's pip list gives for some of them (2026-11): a requirement these do
# not meet is printed as a warning (``--no-deps`` installs anyway; it may still run).
GPU_VERSIONS = {
    "numpy": "2.5.2",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "transformers": "5.17.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    "huggingface-hub": "1.33.0",
}


def environment() -> dict[str, str]:
    env = default_environment()
    env.update(
        python_version="3.12",
        python_full_version="3.12.3",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        extra="",
    )
    return env


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    return [Requirement(text) for text in meta.get_all("Requires-Dist") or []]


def check(folder: Path) -> list[str]:
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return [f"no wheels in {folder}"]
    have = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheels}
    problems = []
    env = environment()
    for wheel in wheels:
        for req in requirements(wheel):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            if name in have:
                version = str(parse_wheel_filename(have[name].name)[1])
                if req.specifier and not req.specifier.contains(version, prereleases=True):
                    problems.append(f"{wheel.name}: needs {req}, the folder has {version}")
            elif name not in GPU_MACHINE:
                problems.append(f"{wheel.name}: needs {req}, neither a wheel here nor there")
            elif name in GPU_VERSIONS and not req.specifier.contains(
                GPU_VERSIONS[name], prereleases=True
            ):
                print(
                    f"WARNING: {wheel.name} asks for {req}; the GPU machine has {GPU_VERSIONS[name]}"
                )
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB (limit {LIMIT_MIB:.0f} MiB):")
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    if size > LIMIT_MIB:
        problems.append(f"{size:.1f} MiB of wheels > {LIMIT_MIB:.0f} MiB")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    problems = check(Path(argv[0] if argv else ".whl"))
    for line in problems:
        print(f"MISSING: {line}")
    print("wheel closure OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
