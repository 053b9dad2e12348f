"""Before a run: cheap input checks, data loading and seeding (used by run/prune.py)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .. import data as data_mod
from ..core.config import PruneConfig
from ..core.masks import ffn_keep, final_head_shapes
from ..errors import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_prunable(cfg: PruneConfig, spec, prunable: list[int]) -> None:
    """Reject settings that cannot be met, before any expensive work."""
    for i in prunable:
        s = spec.layers[i]
        if "ffn" in cfg.target_list and ffn_keep(cfg.ratio, s.intermediate_size, cfg.round_to) < 1:
            raise UserError(f"--ratio {cfg.ratio} leaves zero FFN channels in layer {i}; lower the ratio")
    if cfg.uniform and "heads" in cfg.target_list:
        for i in prunable:
            a, b = final_head_shapes(spec.layers[i], cfg.ratio)[0]
            if spec.hidden_size % (a * b):
                raise UserError(
                    f"--uniform: {a * b} kept query heads per layer do not divide hidden size "
                    f"{spec.hidden_size}, which stock transformers configs require; choose another ratio "
                    "or drop --uniform (the heterogeneous export has no such limit)")


def preflight(cfg: PruneConfig) -> None:
    """Cheap checks of paths before any loading, so typos fail in a second."""
    from ..models import resolve_model_path

    if cfg.model not in (None, "", "embedded"):
        resolve_model_path(cfg.model)
    for src in [cfg.data] + (cfg.eval_list if cfg.eval_windows else []):
        if src and ("/" in src or Path(src).suffix) and not src.startswith("hf:") \
                and not Path(src).expanduser().is_file():
            raise UserError(f"data file {src} does not exist")


def load_training_ids(cfg: PruneConfig, tokenizer) -> torch.Tensor:
    docs = data_mod.load_documents(cfg.data, "train", cfg.text_field)
    return data_mod.tokenize_documents(tokenizer, docs)


def load_eval_sets(cfg: PruneConfig, tokenizer) -> list[tuple[torch.Tensor, dict]]:
    """(token ids, provenance) of every --eval-data text, in order (none when --eval-windows 0)."""
    return [load_eval_ids(spec, cfg, tokenizer) for spec in (cfg.eval_list if cfg.eval_windows else [])]


def load_eval_ids(spec: str, cfg: PruneConfig, tokenizer) -> tuple[torch.Tensor, dict]:
    docs = data_mod.load_documents(spec, "test", cfg.text_field)
    text = data_mod.join_documents(docs)
    meta = {"dataset": spec, "split": "heldout" if spec.startswith("sotu") else "test",
            "content_sha256_16": data_mod.content_hash(text)}
    if spec.startswith("sotu"):
        meta["heldout_rule"] = data_mod.SOTU_HOLDOUT_RULE
    return data_mod.tokenize_text(tokenizer, text), meta
