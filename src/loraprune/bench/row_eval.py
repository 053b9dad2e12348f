"""Evaluating bench rows: one protocol for the dense model and every row (perplexity on the first K
windows of each text, the zero-shot mean), the row's model rebuilt from the base + its adapter +
its masks, and whether saved numbers were measured with the current protocol (for --resume)."""
from __future__ import annotations

from pathlib import Path

from .options import BenchOptions, zeroshot_api


def eval_protocols(opts: BenchOptions) -> dict:
    """name -> provenance of each eval text (dataset, split, content hash): checked before any run,
    and used by --resume to tell whether saved numbers were measured on the same text."""
    from ..eval.ppl_suite import load_ppl_text

    return {name: load_ppl_text(name)[1] for name in opts.evals}


def eval_model(model, tokenizer, opts: BenchOptions, seed: int, label: str) -> dict:
    """{eval name: perplexity record, "zeroshot": zeroshot_mean record} (docs/results-format.md)."""
    from ..eval.ppl_suite import PplSettings, ppl_record

    settings = PplSettings(ctx=opts.eval_ctx, max_windows=opts.eval_windows or None, seed=seed)
    out = {name: ppl_record(model, tokenizer, name, settings, model_label=label) for name in opts.evals}
    if opts.zero_shot:
        zs = zeroshot_api()
        settings = zs.ZeroShotSettings(limit=opts.zero_shot_limit, sample=opts.zero_shot_sample, sample_seed=seed,
                                       batch_size=opts.zero_shot_batch_size)
        out["zeroshot"] = zs.zeroshot_mean(model, tokenizer, opts.zero_shot, settings, model_label=label)
    return out


def load_row_model(opts: BenchOptions, run_dir: Path):
    """Base model + the row's adapter merged in + its masks attached (eval only). A row on a
    quantized base is evaluated as its export (LoRA merged into the dequantized weights, sliced)."""
    from peft import PeftModel

    from ..core.arch import model_spec
    from ..core.masks import MaskSet
    from ..files import read_json
    from ..models import load_model

    trust = bool(opts.prune_flags.get("trust_remote_code", False))
    if (read_json(run_dir / "loraprune_config.json") or {}).get("base_quant", "none") != "none":
        return load_model(str(run_dir), "fp32").eval()
    base = load_model(opts.model, "fp32", trust)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    if (run_dir / "element_masks.safetensors").is_file():  # N:M / unstructured row: zero the pruned weights
        from ..core.element_masks import ElementMasks

        ElementMasks.load(run_dir / "element_masks.safetensors").apply_to_model(model)
    masks = MaskSet.load(run_dir / "masks.json", model_spec(model.config))
    masks.attach(model)
    return model.eval()


def same_protocol(ev: dict | None, protocols: dict, opts: BenchOptions) -> bool:
    """Whether saved eval records were measured with the current protocol (for --resume)."""
    ev = ev or {}
    for name, meta in protocols.items():
        r = ev.get(name)
        if not r or r.get("ctx") != opts.eval_ctx or r.get("content_sha256_16") != meta["content_sha256_16"]:
            return False
        if r.get("max_windows") != (opts.eval_windows or None):
            return False
    if opts.zero_shot:
        z = ev.get("zeroshot") or {}
        want = (f"first {opts.zero_shot_limit}" if opts.zero_shot_limit else None) or (
            f"random {opts.zero_shot_sample} (seed {int(opts.prune_flags.get('seed', 0))})"
            if opts.zero_shot_sample else "all")
        batches = {r.get("batch_size", 1) for r in (z.get("per_task") or {}).values()}
        return z.get("tasks") == list(opts.zero_shot) and z.get("limit") == opts.zero_shot_limit \
            and z.get("subset") == want and batches == {opts.zero_shot_batch_size}
    return True
