"""Architecture knowledge as data, in one place: the model families, the seven projections of a
decoder layer, and which unit owns which rows or columns of each.

Supported: LLaMA-family decoders (llama, mistral, qwen2, our heterogeneous exports of them, and
`loraprune_llama` exports of loraprune < 0.2). Every layer has self_attn.{q,k,v,o}_proj and
mlp.{gate,up,down}_proj.

Units of layer i (shapes are nn.Linear weights, [out_features, in_features]; d = head_dim):
  query head h   owns q_proj rows [h*d, (h+1)*d) (and bias) and o_proj columns [h*d, (h+1)*d)
  KV head g      owns k_proj and v_proj rows [g*d, (g+1)*d); serves query heads g*n_rep ... +n_rep-1
  FFN channel c  owns gate_proj and up_proj row c (and bias) and down_proj column c
GQA rule: a KV head is removed only together with all its query heads, and every kept KV head keeps
the same number of query heads (stock attention repeats each KV head n_rep times).

Everything that needs "which slice of which weight belongs to a unit" (scoring, masking hooks,
element masks, slicing, parameter counts, file checks) reads `PROJECTIONS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

FAMILIES = ("llama", "mistral", "qwen2")      # the stock families (also in export/modeling_loraprune.py)
LEGACY_EXPORT = "loraprune_llama"             # model_type of heterogeneous exports of loraprune < 0.2
SUPPORTED = FAMILIES + (LEGACY_EXPORT,)
UNIT_KINDS = ("heads", "kv", "ffn")


@dataclass(frozen=True)
class Projection:
    name: str     # attribute name, e.g. "q_proj"
    parent: str   # "self_attn" or "mlp"
    unit: str     # the unit kind that owns slices of it: heads, kv or ffn
    side: str     # "rows": a unit owns output rows (and their bias entries); "cols": input columns

    @property
    def path(self) -> str:
        """Module path inside a decoder layer (state-dict key infix)."""
        return f"{self.parent}.{self.name}"


PROJECTIONS = (
    Projection("q_proj", "self_attn", "heads", "rows"),
    Projection("k_proj", "self_attn", "kv", "rows"),
    Projection("v_proj", "self_attn", "kv", "rows"),
    Projection("o_proj", "self_attn", "heads", "cols"),
    Projection("gate_proj", "mlp", "ffn", "rows"),
    Projection("up_proj", "mlp", "ffn", "rows"),
    Projection("down_proj", "mlp", "ffn", "cols"),
)
PROJ = {p.name: p for p in PROJECTIONS}
TARGET_MODULES = [p.name for p in PROJECTIONS]
ROW_PROJECTIONS = tuple(p.name for p in PROJECTIONS if p.side == "rows")
# state-dict keys of the projection weights: (layer index, projection name)
WEIGHT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.("
                        + "|".join(p.name for p in PROJECTIONS) + r")\.weight$")


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

    def count(self, unit: str) -> int:
        return {"heads": self.num_heads, "kv": self.num_kv_heads, "ffn": self.intermediate_size}[unit]

    def width(self, unit: str) -> int:
        """Rows (or columns) of one unit in a projection it owns: head_dim for heads and KV heads."""
        return 1 if unit == "ffn" else self.head_dim


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

    def has_bias(self, proj: Projection) -> bool:
        return self.qkv_bias if proj.parent == "self_attn" else self.mlp_bias


def _per_layer(cfg, name: str, n: int, default) -> list[int]:
    per = getattr(cfg, "layer_" + name, None)
    return [int(v) for v in per] if per is not None else [int(default)] * n


def model_spec(config) -> ModelSpec:
    """Read the group spec from a transformers config (no hard-coded counts)."""
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED:
        raise UserError(f"unsupported architecture {mtype!r}: loraprune supports LLaMA-family "
                        f"decoders ({', '.join(FAMILIES)})")
    n = int(config.num_hidden_layers)
    heads = _per_layer(config, "num_attention_heads", n, config.num_attention_heads)
    kv = _per_layer(config, "num_key_value_heads", n,
                    getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    ffn = _per_layer(config, "intermediate_size", n, config.intermediate_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = []
    for i in range(n):
        if heads[i] % kv[i]:
            raise UserError(f"layer {i}: {heads[i]} query heads do not divide into {kv[i]} KV heads")
        layers.append(LayerSpec(i, heads[i], kv[i], int(head_dim), ffn[i]))
    family = family_of(config)
    qkv_bias = family == "qwen2" or bool(getattr(config, "attention_bias", False))
    return ModelSpec(mtype, int(config.hidden_size), tuple(layers), qkv_bias=qkv_bias,
                     mlp_bias=bool(getattr(config, "mlp_bias", False)))


def family_of(config) -> str:
    """llama, mistral or qwen2: the stock family of a config (our exports record their source's)."""
    mtype = getattr(config, "model_type", None)
    family = getattr(config, "source_model_type", None) if mtype == LEGACY_EXPORT else mtype
    if family not in FAMILIES:
        raise UserError(f"unsupported architecture {family!r}: loraprune supports {', '.join(FAMILIES)}")
    return family


def unwrap(model):
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    base = unwrap(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"{type(base).__name__} has no model.layers; not a LLaMA-family decoder")
    return layers


def layer_modules(model, i: int) -> dict:
    """name -> module for the seven projections of layer i (peft LoRA wrappers when present)."""
    layer = decoder_layers(model)[i]
    return {p.name: getattr(getattr(layer, p.parent), p.name) for p in PROJECTIONS}


def key_name(i: int, name: str) -> str:
    """The name of projection `name` of layer i in element-mask files and checkpoints."""
    return f"layers.{i}.{name}"


def parse_key(key: str) -> tuple[int, str]:
    _, i, name = key.split(".")
    return int(i), name


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
