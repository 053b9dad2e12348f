"""The config of a compact model: the source family's stock config when every layer keeps the same
counts and the family accepts them, else our heterogeneous config (export/modeling_loraprune.py)."""
from __future__ import annotations

from ..core.arch import family_of
from ..core.masks import MaskSet
from ..errors import UserError

# config.json keys that describe the saved object rather than the architecture
_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
              "torch_dtype", "quantization_config", "layer_num_attention_heads", "layer_num_key_value_heads",
              "layer_intermediate_size", "source_model_type")


def source_family(config) -> str:
    return family_of(config)


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
        **_base_dict(config), "source_model_type": source_family(config), "head_dim": head_dim,
        "layer_num_attention_heads": heads, "layer_num_key_value_heads": kv,
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
