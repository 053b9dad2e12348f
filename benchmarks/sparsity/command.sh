#!/bin/sh
# The committed table: run from anywhere; writes runs/sparsity-bench/ (exported models are deleted after
# the speed measurement; results.json/.md and each row's report are copied here).
cd "$(dirname "$0")/../.."
exec .venv/bin/loraprune bench --ratios 0.5 --criteria lora --schedules iterative \
  --patterns structured,2:4,unstructured --element-criteria lora,magnitude,wanda --no-recovery --speed \
  --sparsity 0.5 --steps 40 --seq-len 128 --batch-size 4 --prune-every 4 --threads 1 --save-every 0 \
  --lr 0.0003 --distill-alpha 0 \
  --eval ptb,sotu --eval-windows 16 --out runs/sparsity-bench
