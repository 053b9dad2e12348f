"""A LLaMA-family causal LM whose decoder layers may have different widths (pruned by loraprune).

This file is copied next to every heterogeneous export, so the checkpoint loads in a fresh process
with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It imports only torch and
transformers, and it builds nothing but stock transformers modules:

- `LoraPruneLlamaConfig` is the source family's config (LLaMA fields, plus whatever the source config
  carried, e.g. Qwen2's `layer_types`) with per-layer lists `layer_num_attention_heads`,
  `layer_num_key_value_heads` and `layer_intermediate_size`. Top-level `num_attention_heads` /
  `num_key_value_heads` / `intermediate_size` keep the source (dense) model's values, so that the
  family's stock config accepts config.json; `head_dim` is explicit.
- `model_type` is the source family's (llama, mistral, qwen2; one config/model class pair each), so
  tools that only read the config, above all `AutoTokenizer.from_pretrained(dir)` (which loads
  `config.json` first), take the stock config class and need no remote code: the tokenizer is stock.
  The model itself needs these classes: `auto_map` names them (trust_remote_code=True), and a stock
  LlamaForCausalLM refuses the weights (size mismatch) rather than loading them wrongly.
- Layer i is a stock `LlamaDecoderLayer` (`Qwen2DecoderLayer` / `MistralDecoderLayer` for those
  sources) built from a view of the config in which the three widths are layer i's.
- Everything else (embedding, rotary, norms, masks, cache, forward, generate) is the stock model's.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding)
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer, MistralModel, MistralPreTrainedModel, MistralRMSNorm, MistralRotaryEmbedding)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer, Qwen2Model, Qwen2PreTrainedModel, Qwen2RMSNorm, Qwen2RotaryEmbedding)

PER_LAYER = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


@strict(accept_kwargs=True)  # accept_kwargs: keep source-family fields (e.g. Qwen2 layer_types)
class LoraPruneLlamaConfig(LlamaConfig):
    model_type = "llama"

    source_model_type: str = "llama"  # llama, mistral or qwen2: which stock decoder layer to build
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Fields the stock Mistral / Qwen2 forward reads; a source config normally carries them.
        if self.source_model_type in ("mistral", "qwen2") and not hasattr(self, "sliding_window"):
            self.sliding_window = None
        if self.source_model_type == "qwen2" and getattr(self, "layer_types", None) is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers

    def validate_architecture(self):
        # Replaces LlamaConfig's check (hidden_size % num_attention_heads == 0): with an explicit
        # head_dim a layer may keep any number of heads.
        if self.source_model_type not in _MODELS:
            raise ValueError(f"source_model_type must be one of {sorted(_MODELS)}, got {self.source_model_type!r}")
        for name in PER_LAYER:
            values = getattr(self, "layer_" + name)
            if values is not None and len(values) != self.num_hidden_layers:
                raise ValueError(f"layer_{name} has {len(values)} entries for {self.num_hidden_layers} layers")
        for i in range(self.num_hidden_layers):
            heads, kv = self.layer_value("num_attention_heads", i), self.layer_value("num_key_value_heads", i)
            if heads < 1 or kv < 1 or heads % kv:
                raise ValueError(f"layer {i}: {heads} query heads do not divide into {kv} KV heads")

    def layer_value(self, name: str, i: int) -> int:
        values = getattr(self, "layer_" + name)
        return int(values[i]) if values is not None else int(getattr(self, name))


class LayerConfigView:
    """Config as seen by layer i: the shared config, with layer i's widths.

    A view rather than a copy, so later changes to the shared config (e.g. the attention
    implementation chosen by `set_attn_implementation`) reach every layer."""

    def __init__(self, config: LoraPruneLlamaConfig, i: int):
        self._config = config
        self._widths = {name: config.layer_value(name, i) for name in PER_LAYER}

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_config", "_widths"):
            raise AttributeError(name)  # copy/pickle probe dunders; never recurse before __init__
        if name in self._widths:
            return self._widths[name]
        return getattr(self._config, name)


def _build(model, config, layer_cls, norm_cls, rotary_cls):
    """The body of the stock <Family>Model.__init__, with per-layer widths."""
    model.padding_idx = config.pad_token_id
    model.vocab_size = config.vocab_size
    model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, model.padding_idx)
    model.layers = nn.ModuleList(
        [layer_cls(LayerConfigView(config, i), i) for i in range(config.num_hidden_layers)])
    model.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
    model.rotary_emb = rotary_cls(config=config)
    model.gradient_checkpointing = False


class LoraPruneLlamaModel(LlamaModel):
    config_class = LoraPruneLlamaConfig

    def __init__(self, config: LoraPruneLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        _build(self, config, LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding)
        self.post_init()


class LoraPruneMistralModel(MistralModel):
    config_class = LoraPruneLlamaConfig

    def __init__(self, config: LoraPruneLlamaConfig):
        MistralPreTrainedModel.__init__(self, config)
        _build(self, config, MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding)
        self.post_init()


class LoraPruneQwen2Model(Qwen2Model):
    config_class = LoraPruneLlamaConfig

    def __init__(self, config: LoraPruneLlamaConfig):
        Qwen2PreTrainedModel.__init__(self, config)
        _build(self, config, Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding)
        self.has_sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or [])
        self.post_init()


_MODELS = {"llama": LoraPruneLlamaModel, "mistral": LoraPruneMistralModel, "qwen2": LoraPruneQwen2Model}


class LoraPruneLlamaForCausalLM(LlamaForCausalLM):
    """Stock LlamaForCausalLM (forward, generate, tied lm_head) around a per-layer-width decoder."""

    config_class = LoraPruneLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"]

    def __init__(self, config: LoraPruneLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = _MODELS[config.source_model_type](config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


# One (config, model) class pair per model_type: a config class's model_type must equal the one in
# config.json, or transformers warns that it instantiates one type from another.
@strict(accept_kwargs=True)
class LoraPruneMistralConfig(LoraPruneLlamaConfig):
    model_type = "mistral"


@strict(accept_kwargs=True)
class LoraPruneQwen2Config(LoraPruneLlamaConfig):
    model_type = "qwen2"


@strict(accept_kwargs=True)
class LoraPruneLegacyConfig(LoraPruneLlamaConfig):
    """Exports written before loraprune 0.2 said model_type `loraprune_llama` (read, never written)."""
    model_type = "loraprune_llama"


class LoraPruneMistralForCausalLM(LoraPruneLlamaForCausalLM):
    config_class = LoraPruneMistralConfig


class LoraPruneQwen2ForCausalLM(LoraPruneLlamaForCausalLM):
    config_class = LoraPruneQwen2Config


class LoraPruneLegacyForCausalLM(LoraPruneLlamaForCausalLM):
    config_class = LoraPruneLegacyConfig


CONFIGS = {"llama": LoraPruneLlamaConfig, "mistral": LoraPruneMistralConfig, "qwen2": LoraPruneQwen2Config,
           "loraprune_llama": LoraPruneLegacyConfig}
CAUSAL_LMS = {"llama": LoraPruneLlamaForCausalLM, "mistral": LoraPruneMistralForCausalLM,
              "qwen2": LoraPruneQwen2ForCausalLM, "loraprune_llama": LoraPruneLegacyForCausalLM}

# Saving writes auto_map into config.json and copies this file next to the weights.
for _cls in CONFIGS.values():
    _cls.register_for_auto_class()
for _cls in CAUSAL_LMS.values():
    _cls.register_for_auto_class("AutoModelForCausalLM")
