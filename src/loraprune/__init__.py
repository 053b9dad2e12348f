"""loraprune: LoRA-guided structured pruning (LoRAPrune) with compact, reloadable checkpoints.

Importing the package is cheap (no torch, no transformers): the CLI's --help and argument errors
answer at once, and each subcommand imports the heavy stack only when it runs.
"""
__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Register the model_type `loraprune_llama` of exports written before loraprune 0.2 with
    AutoConfig / AutoModelForCausalLM, so that `from_pretrained` loads them without
    trust_remote_code. Idempotent; `loraprune.models.load_model` calls it. (Current heterogeneous
    exports carry the source family's model_type; load them with trust_remote_code=True or with
    `loraprune.models.load_model`.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .export.modeling_loraprune import LoraPruneLegacyConfig, LoraPruneLegacyForCausalLM

    AutoConfig.register(LoraPruneLegacyConfig.model_type, LoraPruneLegacyConfig, exist_ok=True)
    AutoModelForCausalLM.register(LoraPruneLegacyConfig, LoraPruneLegacyForCausalLM, exist_ok=True)
