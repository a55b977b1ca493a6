#!/usr/bin/env bash
# The GPU check (issue #20): curate scoring, recaptioning and training on CUDA with
# ViT-B/32-size models built from configs (random weights), on synthetic and run-time data;
# prints pairs/s and GPU memory (benchmarks/gpu_check.py), in under 8 minutes on an H100/H200.
#
# The GPU machine has Python 3.12 with torch, torchvision, transformers, timm, pyarrow and
# pillow but no apache-beam or open_clip, and reaches no package registry. Prepare the wheels
# here first (`make gpu-wheels`: .whl/, ~39 MiB), then on the GPU machine, from the repo root:
#
#     bash benchmarks/gpu_check.sh              # installs .whl/*.whl into /tmp/capgap-site
#     bash benchmarks/gpu_check.sh --dry-run    # here, on CPU: micro model, small sizes
#     bash benchmarks/gpu_check.sh --cpu        # the same
#
# Extra arguments go to benchmarks/gpu_check.py (e.g. --only curate,train).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run | --cpu) DRY=1 ;;
    *) ARGS+=("$arg") ;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  # The wheels themselves cannot run on this Python; check that they are complete instead.
  if [ -d .whl ]; then "$PY" benchmarks/wheel_closure.py .whl | tail -1; fi
  exec timeout 900 "$PY" benchmarks/gpu_check.py --dry-run "${ARGS[@]}"
fi
PY=${PY:-python3}
SITE=${SITE:-/tmp/capgap-site}
if ! "$PY" -c "import apache_beam, open_clip" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run 'make gpu-wheels' where pip works" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# 8 minutes for the check itself; gpu_check.py prints each section's JSON as it finishes.
exec timeout 480 "$PY" benchmarks/gpu_check.py --device cuda "${ARGS[@]}"
