"""Export an existing prune run (the library form of `loraprune export RUN_DIR --out DIR`): rebuild its
base model, load its adapter/ and masks, merge, slice and save."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


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
               overwrite: bool = False, save_quant: str | None = None) -> dict:
    """Library form of the command: returns the export info (also written to OUT/export.json)."""
    from ..files import atomic_dir, check_out_dir, write_json

    run, cfg = read_run(run_dir)
    out_path = check_out_dir(out, overwrite)
    if out_path.resolve() == run.resolve():
        raise UserError("--out must differ from RUN_DIR")
    uniform = bool(cfg.get("uniform", False)) if uniform is None else uniform
    save_dtype = save_dtype or cfg.get("save_dtype", "fp32")

    from peft import PeftModel

    from ..core.arch import model_spec
    from ..core.masks import MaskSet
    from ..models import load_model, load_tokenizer
    from .compact import export_compact

    trust = bool(cfg.get("trust_remote_code", False))
    tokenizer = load_tokenizer(cfg.get("model"), trust)
    model = load_model(cfg.get("model"), "fp32", trust, quant=cfg.get("base_quant", "none"))  # the run's base
    spec = model_spec(model.config)
    masks = MaskSet.load(run / "masks.json", spec)
    element_masks = None
    if (run / "element_masks.safetensors").is_file():  # --pattern N:M / unstructured run
        from ..core.element_masks import ElementMasks

        element_masks = ElementMasks.load(run / "element_masks.safetensors")
    try:
        model = PeftModel.from_pretrained(model, run / "adapter")
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"cannot load {run / 'adapter'} onto the run's base model: "
                        f"{str(err).splitlines()[0]}") from None
    model.eval()
    with atomic_dir(out_path) as tmp:
        info = export_compact(model, masks, tmp, tokenizer=tokenizer, uniform=uniform, save_dtype=save_dtype,
                              element_masks=element_masks, save_quant=save_quant or cfg.get("save_quant", "none"))
        info["source_run"] = str(run.resolve())
        write_json(tmp / "export.json", info)
    info["out"] = str(out_path)
    return info
