#!/usr/bin/env bash
# The GPU suite on the workplace's lent GPU machine, in one call.
#
# That machine has its own Python (3.12) and PyTorch (2.11, CUDA) and no package registry; of this project's
# requirements it lacks gin-config, pyro-ppl and pyro-api, which travel as wheels in .whl/ (git-ignored), and the
# project itself runs from the copied checkout on PYTHONPATH (nothing is installed there but those wheels).
#
#   bash benchmarks/gpu_device.sh prepare   # here, where pip reaches PyPI: the three wheels into .whl/
#   bash benchmarks/gpu_device.sh run       # there (the device tool's run, carry [".whl"]): the suite into $OUT
#
# `run` writes gpu_suite.json, gpu_suite.md and gpu_suite.log (everything printed, tracebacks included) under $OUT
# (benchmarks/results without it); copy the first two into benchmarks/results and commit them.
# Tested on the CPU with the same versions (Python 3.12, torch 2.11, wheels installed with --target):
# `bash benchmarks/gpu_device.sh run --smoke` runs the smoke suite that way.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(gin-config==0.5.0 pyro-ppl==1.9.2 pyro-api==0.1.2)
WHEEL_DIR=${WHEEL_DIR:-.whl}
PYTHON=${PYTHON:-python3}

case "${1:-}" in
  prepare)
    mkdir -p "$WHEEL_DIR"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEEL_DIR" "${WHEELS[@]}"
    ls -l "$WHEEL_DIR"
    ;;
  run)
    shift
    ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1 || {
      echo "no wheels in $WHEEL_DIR/: run 'bash benchmarks/gpu_device.sh prepare' first and carry $WHEEL_DIR" >&2; exit 2; }
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEEL_DIR"/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    out=${OUT:-benchmarks/results}
    mkdir -p "$out"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    "$PYTHON" -c "import torch, pyro, gin; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyro', pyro.__version__)"
    set +e
    "$PYTHON" benchmarks/gpu_suite.py --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
    exit "${PIPESTATUS[0]}"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_device.sh prepare | run [gpu_suite.py options]" >&2
    exit 2
    ;;
esac
