"""Compact export: merge LoRA into the weights, physically remove the masked units, save a checkpoint
that stock `from_pretrained` loads.

Slicing (d = head_dim; weights are nn.Linear [out_features, in_features]):
  q_proj rows (and bias) of the kept query heads      o_proj columns of the kept query heads
  k_proj, v_proj rows (and biases) of the kept KV heads
  gate_proj, up_proj rows (and biases) of the kept FFN channels   down_proj columns of the kept channels
Kept heads stay in their original order, so the kept query heads of kept KV head g form one
contiguous block and stock GQA (KV head j serves query heads j*n_rep' ... (j+1)*n_rep'-1) pairs
them correctly. o_proj / down_proj biases (output side) are untouched.

Two checkpoint kinds:
- stock: every layer keeps the same counts and the source family's stock config accepts them
  (LLaMA needs hidden_size % heads == 0) -> a plain LlamaConfig / Qwen2Config / MistralConfig.
- heterogeneous: per-layer widths in the source family's config (modeling_loraprune.py, copied next to
  the weights; loads with trust_remote_code=True, or with loraprune.models.load_model without it).
The caller's model is never modified: merged weights are computed from peft's public attributes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .arch import decoder_layers, unwrap
from .errors import UserError
from .masks import MaskSet

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FAMILIES = ("llama", "mistral", "qwen2")
# config.json keys that describe the saved object rather than the architecture
_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
              "torch_dtype", "quantization_config", "layer_num_attention_heads", "layer_num_key_value_heads",
              "layer_intermediate_size", "source_model_type")


# ---- merging ------------------------------------------------------------------------------------
def _is_lora(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def merged_linear(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) that `module` computes in eval mode: a plain Linear, or
    a peft LoRA Linear with its active, not yet merged adapters added (W + s*B@A). Read-only."""
    if not _is_lora(module):
        return module.weight.detach(), (None if module.bias is None else module.bias.detach())
    base = module.base_layer
    weight = base.weight.detach()
    bias = None if base.bias is None else base.bias.detach()
    if module.disable_adapters or module.merged:
        return weight, bias  # forward uses base_layer alone (merged adapters are already in it)
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name):
            raise UserError(f"adapter {name!r} is a LoRA variant (e.g. DoRA); export supports plain LoRA")
        if module.lora_bias.get(name):
            raise UserError(f"adapter {name!r} has lora_bias=True; export supports plain LoRA")
        weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, bias


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict of the underlying transformers model with every LoRA module merged into plain
    `<name>.weight` / `<name>.bias` (names as in the model without peft)."""
    base = unwrap(model)
    lora = {name: mod for name, mod in base.named_modules() if _is_lora(mod)}
    sd = {}
    for key, value in base.state_dict().items():
        if "modules_to_save" in key:
            raise UserError("the adapter has modules_to_save; export supports LoRA on Linear layers only")
        if not any(key.startswith(name + ".") for name in lora):
            sd[key] = value.detach().clone()  # a copy: the exported model must not alias the source
    for name, mod in lora.items():
        weight, bias = merged_linear(mod)
        sd[name + ".weight"] = weight.clone()
        if bias is not None:
            sd[name + ".bias"] = bias.clone()
    return sd


# ---- slicing ------------------------------------------------------------------------------------
def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of `units` blocks of `size` rows each: [u0*size ... u0*size+size-1, u1*size ...]."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def layer_indices(masks: MaskSet, i: int) -> dict[str, torch.Tensor]:
    """Kept row/column indices of layer i: q (query-head rows), kv (KV-head rows), ffn (channels)."""
    s, m = masks.spec.layers[i], masks.layers[i]
    heads = m.heads.nonzero().flatten()
    kv = m.kv.nonzero().flatten()
    per_kv = m.heads.view(s.num_kv_heads, s.n_rep).sum(1)
    # The GQA rule: query heads only in kept groups, every kept group the same count.
    if per_kv[~m.kv].any() or len(set(per_kv[m.kv].tolist())) > 1 or heads.numel() == 0:
        raise UserError(f"masks of layer {i} break the GQA rule (kept query heads per kept KV head: "
                        f"{per_kv.tolist()}, KV heads kept: {m.kv.int().tolist()})")
    if m.ffn.sum() == 0:
        raise UserError(f"masks of layer {i} keep no FFN channel")
    return {"q": _rows(heads, s.head_dim), "kv": _rows(kv, s.head_dim), "ffn": m.ffn.nonzero().flatten()}


def slice_layer(sd: dict, prefix: str, idx: dict[str, torch.Tensor]) -> None:
    """Slice the seven projections of one decoder layer in the state dict (in place of the dict)."""
    def rows(name, which):
        for part in ("weight", "bias"):
            key = f"{prefix}.{name}.{part}"
            if key in sd:
                sd[key] = sd[key].index_select(0, idx[which]).contiguous()

    def cols(name, which):
        key = f"{prefix}.{name}.weight"
        sd[key] = sd[key].index_select(1, idx[which]).contiguous()

    rows("self_attn.q_proj", "q")
    rows("self_attn.k_proj", "kv")
    rows("self_attn.v_proj", "kv")
    cols("self_attn.o_proj", "q")
    rows("mlp.gate_proj", "ffn")
    rows("mlp.up_proj", "ffn")
    cols("mlp.down_proj", "ffn")


# ---- config -------------------------------------------------------------------------------------
def source_family(config) -> str:
    mtype = config.model_type
    if mtype == "loraprune_llama":
        mtype = config.source_model_type
    if mtype not in FAMILIES:
        raise UserError(f"cannot export a {mtype!r} model: supported families are {', '.join(FAMILIES)}")
    return mtype


def layer_counts(masks: MaskSet) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, FFN channels) kept in each layer."""
    return [(int(m.heads.sum()), int(m.kv.sum()), int(m.ffn.sum())) for m in masks.layers]


def _base_dict(config) -> dict:
    d = config.to_dict()
    for k in _DROP_KEYS:
        d.pop(k, None)
    return d


def stock_config(config, counts, head_dim: int):
    """The source family's stock config with these uniform counts, or (None, reason)."""
    from transformers import AutoConfig

    if len(set(counts)) > 1:
        return None, "layers keep different numbers of heads / KV heads / FFN channels"
    heads, kv, ffn = counts[0]
    family = source_family(config)
    try:
        cfg = AutoConfig.for_model(family, **{**_base_dict(config), "num_attention_heads": heads,
                                              "num_key_value_heads": kv, "intermediate_size": ffn,
                                              "head_dim": head_dim})
    except Exception as err:  # transformers' strict validation: ValueError or its own error types
        return None, f"stock {family} config rejects it: {str(err).splitlines()[-1].strip()}"
    # Qwen2's config has no head_dim field: its attention then uses hidden_size // heads.
    resolved = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if resolved != head_dim:
        return None, (f"stock {family} attention would use head_dim {resolved} "
                      f"(hidden_size {cfg.hidden_size} / {heads} heads), not {head_dim}")
    return cfg, None


def heterogeneous_config(config, counts, head_dim: int):
    from .modeling_loraprune import CONFIGS

    heads, kv, ffn = (list(c) for c in zip(*counts))
    # Top-level widths stay the source's (dense) ones: a stock config built from this config.json
    # (AutoTokenizer does that) must pass the family's validation, e.g. hidden % heads == 0.
    return CONFIGS[source_family(config)](**{
        **_base_dict(config), "source_model_type": source_family(config), "head_dim": head_dim, "layer_num_attention_heads": heads, "layer_num_key_value_heads": kv,
        "layer_intermediate_size": ffn})


def compact_config(config, masks: MaskSet, uniform: bool):
    counts = layer_counts(masks)
    head_dims = {s.head_dim for s in masks.spec.layers}
    if len(head_dims) != 1:
        raise UserError("layers differ in head_dim; export needs one head_dim")
    head_dim = head_dims.pop()
    cfg, why = stock_config(config, counts, head_dim)
    if cfg is not None:
        return cfg
    if uniform:
        raise UserError(f"--uniform: cannot write a stock config: {why}. Drop --uniform to write the "
                        "heterogeneous checkpoint (loads with trust_remote_code=True)")
    return heterogeneous_config(config, counts, head_dim)


def is_heterogeneous(config) -> bool:
    """Whether a config (object or config.json dict) is our per-layer-width export."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return get("layer_num_attention_heads") is not None


# ---- counting -----------------------------------------------------------------------------------
def predicted_params(model, masks: MaskSet) -> int:
    """Parameters of the exported model predicted from the source and the masks: dense count (LoRA
    excluded) minus masks.params_removed() (which counts q/k/v and gate/up biases when present)."""
    base = unwrap(model)
    dense = sum(p.numel() for n, p in base.named_parameters() if ".lora_" not in n)
    return dense - masks.params_removed()


# ---- export -------------------------------------------------------------------------------------
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
                   save_dtype: str = "fp32", element_masks=None) -> dict:
    """Write the compact model (config.json, model.safetensors, generation_config.json, tokenizer
    files, modeling_loraprune.py when heterogeneous) into out_dir; return what was written.

    `model`: a transformers LLaMA-family CausalLM, optionally peft-wrapped with LoRA; not modified."""
    if save_dtype not in SAVE_DTYPES:
        raise UserError(f"unknown save dtype {save_dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    compact = build_compact_model(model, masks, uniform, element_masks)
    params = sum(p.numel() for p in compact.parameters())
    predicted = predicted_params(model, masks)
    if params != predicted:
        raise RuntimeError(f"exported model has {params} parameters, predicted {predicted}")
    compact.to(SAVE_DTYPES[save_dtype])
    out_dir = Path(out_dir)
    before = set(out_dir.iterdir()) if out_dir.exists() else set()
    compact.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    cfg = compact.config
    heterogeneous = is_heterogeneous(cfg)
    counts = layer_counts(masks)
    return {
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
