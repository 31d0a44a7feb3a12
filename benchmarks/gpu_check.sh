#!/usr/bin/env bash
# One GPU check, one table (see benchmarks/gpu_check.py): paper-preset forward images/s (bf16,
# eager and torch.compile), GPU vs CPU JPEG decode, one training step, the whole fit of the
# cpu-small and gpu presets on the GPU with their packages scored on the GPU and the CPU
# (per-precision calibration, scores within tolerance), one Ray Train worker on one GPU (NCCL),
# Ray Data scoring vs model only. Under 8 minutes on one GPU; a section that fails or runs out
# of time is a FAILED row and the others still run (exit status 1 if any failed).
#
#   bash benchmarks/gpu_check.sh                    # PYTHON=... to pick the interpreter
#   bash benchmarks/gpu_check.sh --only fit-cpu-small,ray-train
#
# Exits within seconds with status 2, saying so, on a machine without a CUDA GPU.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
no_gpu() {
    echo "no CUDA GPU: gpu_check needs one ($1)" >&2
    exit 2
}
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3  # a machine may have no "python"
fi
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
nvidia-smi -L >/dev/null 2>&1 || no_gpu "nvidia-smi sees no GPU"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || no_gpu "torch.cuda.is_available() is False in $PY"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # Ray workers import tfa_ray from here too
exec "$PY" -m benchmarks.gpu_check "$@"
