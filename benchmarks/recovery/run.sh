#!/usr/bin/env bash
# The recovery benchmark, one command (several hours on 2 CPUs; rerun it to continue: --resume
# reuses every finished row and probe). See README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/loraprune bench --recipes benchmarks/recovery/recipes.yaml \
  --ratios 0.2,0.5 --time-budget 900 --jobs 2 --threads 1 --lr 0.003 --seq-len 256 --batch-size 4 \
  --save-every 0 --eval ptb,sotu --eval-windows 32 --zero-shot all --zero-shot-sample 200 --zero-shot-batch-size 8 \
  --out benchmarks/recovery --resume "$@"
