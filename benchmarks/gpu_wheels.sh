#!/usr/bin/env bash
# Prepare the wheels benchmarks/gpu_check.sh installs on a GPU machine that reaches no package
# registry (Python 3.12, x86-64, torch/torchvision/transformers/timm/pyarrow/pillow already
# there, no apache-beam or open_clip). Run here, where pip works:
#
#     make gpu-wheels          # or: bash benchmarks/gpu_wheels.sh [DEST]   (default .whl/)
#
# Writes DEST/*.whl (capgap's own wheel included), checks with benchmarks/wheel_closure.py
# that every requirement of every wheel is either in DEST or on the GPU machine's package
# list, and that the total is under 64 MiB (what travels with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST"
# Exactly what the GPU machine lacks: apache-beam and the requirements of it that are not in
# that machine's image; open_clip and its ftfy/wcwidth; datasets (capgap's Hugging Face
# reader) with dill/multiprocess; braceexpand (input patterns). Versions: the ones capgap's
# own venv runs and tests. wheel_closure.py fails the build when capgap gains a requirement
# that is neither here nor on that machine.
PACKAGES=(
  apache-beam==2.77.0 beartype==0.22.9 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  fastavro==1.13.1 fasteners==0.20 httplib2==0.32.1 jsonpickle==4.1.4 objsize==0.7.1
  proto-plus==1.29.0 pymongo==4.20.1 dnspython==2.9.2 pytz==2026.6 zstandard==0.25.0
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  braceexpand==0.1.7
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
# capgap itself, without dependencies (pure Python: one wheel for every platform).
rm -f "$DEST"/capgap-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .
"$PY" benchmarks/wheel_closure.py "$DEST"
