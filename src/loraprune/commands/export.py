"""`loraprune export RUN_DIR --out DIR`: write the compact model of an existing prune run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError


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
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(func=run)


def read_run(run_dir: str) -> tuple[Path, dict]:
    """Check RUN_DIR has what export needs; return (path, the run's config dict)."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    for need in ("loraprune_config.json", "masks.json", "adapter/adapter_config.json"):
        if not (run / need).is_file():
            raise UserError(f"{run_dir} is not a finished prune run: {need} is missing")
    try:
        cfg = json.loads((run / "loraprune_config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {run / 'loraprune_config.json'}: {err}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{run / 'loraprune_config.json'} does not hold a config mapping")
    return run, cfg


def export_run(run_dir: str, out: str, *, uniform: bool | None = None, save_dtype: str | None = None,
               overwrite: bool = False) -> dict:
    """Library form of the command: returns the export info (also written to OUT/export.json)."""
    from ..outdir import atomic_dir, check_out_dir

    run, cfg = read_run(run_dir)
    out_path = check_out_dir(out, overwrite)
    if out_path.resolve() == run.resolve():
        raise UserError("--out must differ from RUN_DIR")
    uniform = bool(cfg.get("uniform", False)) if uniform is None else uniform
    save_dtype = save_dtype or cfg.get("save_dtype", "fp32")

    from peft import PeftModel

    from ..arch import model_spec
    from ..export import export_compact
    from ..masks import MaskSet
    from ..models import load_model, load_tokenizer

    trust = bool(cfg.get("trust_remote_code", False))
    tokenizer = load_tokenizer(cfg.get("model"), trust)
    model = load_model(cfg.get("model"), "fp32", trust)
    spec = model_spec(model.config)
    masks = MaskSet.load(run / "masks.json", spec)
    element_masks = None
    if (run / "element_masks.safetensors").is_file():  # --pattern N:M / unstructured run
        from ..sparsity import ElementMasks

        element_masks = ElementMasks.load(run / "element_masks.safetensors")
    try:
        model = PeftModel.from_pretrained(model, run / "adapter")
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot load {run / 'adapter'} onto the run's base model: "
                        f"{str(err).splitlines()[0]}") from None
    model.eval()
    with atomic_dir(out_path) as tmp:
        info = export_compact(model, masks, tmp, tokenizer=tokenizer, uniform=uniform, save_dtype=save_dtype,
                              element_masks=element_masks)
        info["source_run"] = str(run.resolve())
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    info["out"] = str(out_path)
    return info


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = export_run(args.run_dir, args.out, uniform=args.uniform, save_dtype=args.save_dtype,
                      overwrite=args.overwrite)
    load = ("AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  (or `import loraprune` first)"
            if info["needs_trust_remote_code"] else "AutoModelForCausalLM.from_pretrained(DIR)")
    print(f"wrote {info['out']}: {info['params']:,} parameters, {info['kind']} {info['model_type']} "
          f"config, {info['dtype']} weights", file=sys.stdout)
    print(f"load with: {load}")
    return 0
