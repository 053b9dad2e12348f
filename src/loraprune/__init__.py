"""loraprune: LoRA-guided structured pruning (LoRAPrune) with compact, reloadable checkpoints."""
__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Register the heterogeneous-width export (`loraprune_llama`) with AutoConfig and
    AutoModelForCausalLM, so `from_pretrained` loads it without trust_remote_code. Idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_loraprune import LoraPruneLlamaConfig, LoraPruneLlamaForCausalLM

    AutoConfig.register(LoraPruneLlamaConfig.model_type, LoraPruneLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(LoraPruneLlamaConfig, LoraPruneLlamaForCausalLM, exist_ok=True)


try:  # importing loraprune makes our exported checkpoints loadable by plain from_pretrained
    register_auto_classes()
except ImportError:  # transformers missing: the CLI reports it where it is needed
    pass
