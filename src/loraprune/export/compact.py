"""Compact export: merge LoRA into the weights (merge.py), physically remove the masked units
(slicing.py), and save a checkpoint that `from_pretrained` loads, with the config of configs.py.

Two checkpoint kinds:
- stock: every layer keeps the same counts and the source family's stock config accepts them
  (LLaMA needs hidden_size % heads == 0) -> a plain LlamaConfig / Qwen2Config / MistralConfig.
- heterogeneous: per-layer widths in the source family's config (modeling_loraprune.py, copied next to
  the weights; loads with trust_remote_code=True, or with loraprune.models.load_model without it).
The caller's model is never modified.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.arch import decoder_layers, unwrap
from ..core.config import SAVE_DTYPES
from ..core.quant import n_params, nf4_unfit_layers
from ..core.masks import MaskSet
from ..errors import UserError
from ..models import torch_dtype
from .configs import compact_config, is_heterogeneous, layer_counts, source_family
from .merge import merged_state_dict
from .slicing import layer_indices, slice_layer

log = logging.getLogger(__name__)


def predicted_params(model, masks: MaskSet) -> int:
    """Parameters of the exported model predicted from the source and the masks: dense count (LoRA
    excluded) minus masks.params_removed() (which counts q/k/v and gate/up biases when present)."""
    return n_params(unwrap(model), skip_lora=True) - masks.params_removed()


def build_compact_model(model, masks: MaskSet, uniform: bool = False, element_masks=None):
    """The merged, sliced model (fp32 unless the source is lower precision), in eval mode.
    element_masks (sparsity.ElementMasks): zero the pruned weights of the merged W + s·B·A before
    slicing, and record the pattern as config.loraprune_sparsity (see docs/sparsity.md)."""
    from transformers import AutoModelForCausalLM

    base = unwrap(model)
    if masks.spec.num_layers != len(decoder_layers(base)):
        raise UserError("masks and model differ in layer count")
    sd = merged_state_dict(model)
    names = {id(mod): name for name, mod in base.named_modules()}
    for i, layer in enumerate(decoder_layers(base)):
        if element_masks is not None:
            element_masks.zero_state_dict(sd, names[id(layer)], i)
        slice_layer(sd, names[id(layer)], layer_indices(masks, i))
    cfg = compact_config(base.config, masks, uniform)
    if element_masks is not None:
        cfg.loraprune_sparsity = element_masks.config_entry()
    dtype = next(iter(sd.values())).dtype
    with torch.device("meta"):
        if is_heterogeneous(cfg):
            from .modeling_loraprune import CAUSAL_LMS

            compact = CAUSAL_LMS[cfg.model_type]._from_config(cfg, dtype=dtype)
        else:
            compact = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # assign=True adopts our tensors; tied lm_head/embedding share one tensor either way.
    missing, unexpected = compact.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"compact model mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    compact.tie_weights()
    _materialize_buffers(compact, base)
    if base.generation_config is not None:
        compact.generation_config = base.generation_config
    return compact.eval()


def _materialize_buffers(compact, base) -> None:
    """Non-persistent buffers (rotary inv_freq) were created on the meta device; take the source's."""
    src = dict(base.named_buffers())
    for name, buf in list(compact.named_buffers()):
        if buf.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = compact.get_submodule(owner_name)
        if name not in src:
            raise RuntimeError(f"no source for buffer {name}")
        owner._buffers[attr] = src[name].clone()


def export_compact(model, masks: MaskSet, out_dir, *, tokenizer=None, uniform: bool = False,
                   save_dtype: str = "fp32", element_masks=None, save_quant: str = "none") -> dict:
    # params: the model and its masks, where to write, then keyword-only options of the files
    """Write the compact model (config.json, model.safetensors, generation_config.json, tokenizer
    files, modeling_loraprune.py when heterogeneous) into out_dir; return what was written.
    `save_quant` int8/nf4: the compact float model is then re-quantized with bitsandbytes.

    `model`: a transformers LLaMA-family CausalLM, optionally peft-wrapped with LoRA (on a float or a
    quantized base: LoRA is merged into the dequantized weights in float); not modified."""
    if save_dtype not in SAVE_DTYPES:
        raise UserError(f"unknown save dtype {save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    compact = build_compact_model(model, masks, uniform, element_masks)
    params = sum(p.numel() for p in compact.parameters())
    predicted = predicted_params(model, masks)
    if params != predicted:
        raise RuntimeError(f"exported model has {params} parameters, predicted {predicted}")
    compact.to(torch_dtype(save_dtype))
    out_dir = Path(out_dir)
    before = set(out_dir.iterdir()) if out_dir.exists() else set()
    compact.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    cfg = compact.config
    heterogeneous = is_heterogeneous(cfg)
    counts = layer_counts(masks)
    info = {
        "params": params,
        "params_predicted": predicted,
        "kind": "heterogeneous" if heterogeneous else "stock",
        "uniform": not heterogeneous,
        "model_type": cfg.model_type,
        "source_model_type": source_family(unwrap(model).config),
        "needs_trust_remote_code": heterogeneous,
        "dtype": save_dtype,
        "layers": [{"heads": h, "kv_heads": kv, "ffn": f} for h, kv, f in counts],
        "files": sorted(p.name for p in set(out_dir.iterdir()) - before),
    }
    if element_masks is not None:
        info["sparsity_verified"] = _verify(out_dir)
    if save_quant != "none":
        if element_masks is not None:
            raise UserError("--save-quant would re-round the exact zeros of an element pattern; save it in float")
        _requantize(out_dir, save_quant)
        info["quant"] = save_quant
    info["file_bytes"] = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    return info


def _requantize(out_dir: Path, quant: str) -> None:
    """Load the float files just written with bitsandbytes' quantization and save those instead."""
    import os
    import shutil

    from ..models import load_model

    q = load_model(str(out_dir), "fp32", quant=quant)
    unfit = nf4_unfit_layers(q) if quant == "nf4" else []
    if unfit:
        raise UserError(f"--save-quant nf4: {len(unfit)} layers (first {unfit[0]}) have widths bitsandbytes' "
                        "AVX512-BF16 CPU kernel cannot load (inputs must be multiples of 64, outputs of 32); "
                        "save in float, or prune with --round-to 64")
    tmp = out_dir / ".quantized"
    q.save_pretrained(tmp)
    del q
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)
    shutil.rmtree(tmp)


def _verify(out_dir: Path) -> dict:
    """Check the element pattern on the files just written, block by block (export/verify.py)."""
    from .verify import verify_sparsity

    res = verify_sparsity(out_dir)
    if not res["ok"]:
        raise RuntimeError(f"exported weights violate the {res['pattern']} pattern: {res['violations'][:2]}")
    return {k: res[k] for k in ("ok", "modules_checked", "zeros", "size", "sparsity_measured", "params",
                                "nonzero_params")}
