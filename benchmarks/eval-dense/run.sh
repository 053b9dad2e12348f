#!/bin/sh
# The measurement in README.md, as run: offline, 1 torch thread, from the repository root.
set -e
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/loraprune eval embedded --ppl ptb --ctx 512 --zero-shot all --sample 500 \
  --threads 1 --batch-size 8 --json benchmarks/eval-dense/results.json
