"""`loraprune export RUN_DIR --out DIR`: write the compact model of an existing prune run."""
from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="merge LoRA and slice an existing prune run into a compact model",
                       description="Rebuild the base model of RUN_DIR (loraprune_config.json), load its adapter/ and "
                                   "masks.json, merge LoRA, remove the masked heads and FFN channels, and save a "
                                   "checkpoint that from_pretrained loads.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output directory of `loraprune prune`")
    p.add_argument("--out", required=True, help="directory for the compact model")
    p.add_argument("--uniform", action=argparse.BooleanOptionalAction, default=None,
                   help="require a stock config (every layer keeps the same counts); default: the run's setting. "
                        "Without it a stock config is still written whenever the counts allow")
    p.add_argument("--save-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="dtype of the saved weights (default: the run's --save-dtype)")
    p.add_argument("--save-quant", choices=("none", "int8", "nf4"), default=None,
                   help="re-quantize the compact model with bitsandbytes (default: the run's --save-quant)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..export.from_run import export_run

    if args.threads:
        torch.set_num_threads(args.threads)
    info = export_run(args.run_dir, args.out, uniform=args.uniform, save_dtype=args.save_dtype,
                      overwrite=args.overwrite, save_quant=args.save_quant)
    load = ("AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  (or `import loraprune` first)"
            if info["needs_trust_remote_code"] else "AutoModelForCausalLM.from_pretrained(DIR)")
    print(f"wrote {info['out']}: {info['params']:,} parameters, {info['kind']} {info['model_type']} "
          f"config, {info['dtype']} weights", file=sys.stdout)
    print(f"load with: {load}")
    return 0
