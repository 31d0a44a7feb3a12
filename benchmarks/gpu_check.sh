#!/usr/bin/env bash
# One GPU check, one table (see benchmarks/gpu_check.py): paper-preset forward images/s (bf16,
# eager and torch.compile), GPU vs CPU JPEG decode, Ray Data scoring of 20,000 JPEGs vs model
# only, one training step, AUROC parity CPU vs GPU. Under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                    # PYTHON=... to pick the interpreter
#   bash benchmarks/gpu_check.sh --only decode,parity
#
# Fails within seconds, saying so, on a machine without a CUDA GPU.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
no_gpu() {
    echo "no CUDA GPU: gpu_check needs one ($1)" >&2
    exit 2
}
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi sees no GPU"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || no_gpu "torch.cuda.is_available() is False in $PY"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # Ray workers import tfa_ray from here too
exec "$PY" -m benchmarks.gpu_check "$@"
