"""loraprune: LoRA-guided structured pruning (LoRAPrune) with compact, reloadable checkpoints."""
__version__ = "0.1.0"
