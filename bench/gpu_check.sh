#!/usr/bin/env bash
# A few real steps of experiment=paper_pythia160m on one CUDA GPU (live activations, 32 random-weight snapshots of
# Pythia-160M's shape, d_sae 98,304), measured peak memory and tokens/s against bench/scale.py's predictions.
#   bash bench/gpu_check.sh [--steps N] [--workdir DIR]      # < 8 min on one H100/H200, start to end
#   bash bench/gpu_check.sh --cpu-smoke                      # the same pipeline at tiny shapes on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --cpu-smoke "* ]]; then
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "bench/gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False); it needs one H100/H200." >&2
    echo "  bash bench/gpu_check.sh --cpu-smoke   tests the pipeline on CPU at tiny shapes" >&2
    exit 2
  }
fi
exec timeout 480 python -m bench.gpu_check "$@"
