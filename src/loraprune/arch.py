"""Architecture knowledge as data: which units each decoder layer has and which weights they own.

Supported: LLaMA-family decoders (llama, mistral, qwen2 and our own heterogeneous export
`loraprune_llama`). Every layer has self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj.

Units of layer i (shapes are nn.Linear weights, [out_features, in_features]):
  query head h   owns q_proj rows [h*d, (h+1)*d) (and bias) and o_proj columns [h*d, (h+1)*d)
  KV head g      owns k_proj and v_proj rows [g*d, (g+1)*d); serves query heads g*n_rep ... +n_rep-1
  FFN channel c  owns gate_proj and up_proj row c and down_proj column c
GQA rule: a KV head is removed only together with all its query heads, and every kept KV head keeps
the same number of query heads (stock attention repeats each KV head n_rep times).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

SUPPORTED = ("llama", "mistral", "qwen2", "loraprune_llama")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = list(ATTN + MLP)


@dataclass(frozen=True)
class LayerSpec:
    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_of_head(self, h: int) -> int:
        return h // self.n_rep


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden_size: int
    layers: tuple[LayerSpec, ...]
    qkv_bias: bool = False  # q/k/v have biases (Qwen2; LLaMA attention_bias): their entries go with the rows
    mlp_bias: bool = False  # gate/up/down have biases (LLaMA mlp_bias)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _per_layer(cfg, name: str, n: int) -> list[int]:
    per = getattr(cfg, "layer_" + name, None)
    if per is not None:
        return [int(v) for v in per]
    return [int(getattr(cfg, name))] * n


def model_spec(config) -> ModelSpec:
    """Read the group spec from a transformers config (no hard-coded counts)."""
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED:
        raise UserError(f"unsupported architecture {mtype!r}: loraprune supports LLaMA-family "
                        f"decoders ({', '.join(SUPPORTED[:3])})")
    n = int(config.num_hidden_layers)
    heads = _per_layer(config, "num_attention_heads", n)
    kv_default = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv = (_per_layer(config, "num_key_value_heads", n) if getattr(config, "layer_num_key_value_heads",
                                                                     None) is not None
          else [int(kv_default)] * n)
    ffn = _per_layer(config, "intermediate_size", n)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = []
    for i in range(n):
        if heads[i] % kv[i]:
            raise UserError(f"layer {i}: {heads[i]} query heads do not divide into {kv[i]} KV heads")
        layers.append(LayerSpec(i, heads[i], kv[i], int(head_dim), ffn[i]))
    family = getattr(config, "source_model_type", None) if mtype == "loraprune_llama" else mtype
    qkv_bias = family == "qwen2" or bool(getattr(config, "attention_bias", False))
    return ModelSpec(mtype, int(config.hidden_size), tuple(layers), qkv_bias=qkv_bias,
                     mlp_bias=bool(getattr(config, "mlp_bias", False)))


def unwrap(model):
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    base = unwrap(model)
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UserError(f"{type(base).__name__} has no model.layers; not a LLaMA-family decoder")
    return layers


def layer_modules(model, i: int) -> dict:
    """name -> module for the seven projections of layer i (peft LoRA wrappers when present)."""
    layer = decoder_layers(model)[i]
    mods = {n: getattr(layer.self_attn, n) for n in ATTN}
    mods.update({n: getattr(layer.mlp, n) for n in MLP})
    return mods


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """'auto' -> first 10% of layers and the last one (the paper's default); '' or 'none' -> [];
    otherwise a comma list with ranges and negatives: '0-2,-1'."""
    if text is None or text == "auto":
        first = int(0.1 * num_layers)
        return sorted(set(range(first)) | ({num_layers - 1} if num_layers > 1 else set()))
    if text.strip().lower() in ("", "none"):
        return []
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise UserError(f"cannot parse layer list {text!r}: use e.g. '0-2,29', '-1' or 'auto'")
        ends = [int(g) for g in m.groups() if g is not None]
        for v in ends:
            if not -num_layers <= v < num_layers:
                raise UserError(f"layer {v} is out of range for a {num_layers}-layer model")
        lo, hi = ends[0] % num_layers, ends[-1] % num_layers
        out.update(range(lo, hi + 1))
    return sorted(out)
