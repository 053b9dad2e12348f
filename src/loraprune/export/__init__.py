"""Making the model small: merge LoRA (merge.py), slice the masked units (slicing.py), write a
checkpoint with a stock or per-layer-width config (configs.py, compact.py, modeling_loraprune.py),
export an existing run (from_run.py), check element sparsity on files (verify.py)."""
