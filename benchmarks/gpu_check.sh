#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA GPU (and without network access): the speed
# table of benchmarks/gpu.py and a 3-minute LGG fold, over the LGG patients in LGG_DIR, JSON to OUT_JSON.
#   bash benchmarks/gpu_check.sh [LGG_DIR] [OUT_JSON]
set -o pipefail
LGG_DIR=${1:-tests/fixtures/lgg/kaggle_3m}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 | awk '{print tolower($NF)}')
OUT_JSON=${2:-benchmarks/results/gpu_${GPU}.json}
nvidia-smi -L
PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --lgg "$LGG_DIR" --fold-minutes 3 --out "$OUT_JSON"
