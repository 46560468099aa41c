#!/usr/bin/env bash
# The GPU check in one command: bash scripts/gpu_check.sh OUTDIR   (at most 8 minutes on one H200)
#
# Measures what scripts/gpu_check.py lists into OUTDIR/gpu_check.json. A machine whose image has
# JAX with CUDA but not all of jaxsam's pure-Python dependencies gets them from .whl/, which
# `bash scripts/gpu_check.sh --wheels` fills here (where pip can reach the registry).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheels" ]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl ml_collections tensorboardX
  ls .whl
  exit 0
fi
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR  (or --wheels to fetch the wheels a bare GPU image lacks)}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/jaxsam-site .whl/*.whl
  export PYTHONPATH=/tmp/jaxsam-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout 480 python3 scripts/gpu_check.py --out "$out" --budget_s 400
