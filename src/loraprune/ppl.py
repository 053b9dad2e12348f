"""Perplexity over non-overlapping windows: the one protocol used everywhere in loraprune.

The token stream is cut into windows of `ctx` tokens (the tail shorter than ctx is dropped);
each window is scored independently (no carried context); PPL = exp(mean NLL over every predicted
token of every window used), i.e. ctx - 1 predictions per window.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    n = ids.numel() // ctx
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * ctx].view(n, ctx)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int = 512, max_windows: int | None = None,
               batch_size: int = 1, progress=None) -> dict:
    """Return {"ppl", "nll", "windows", "tokens", "ctx"} for a 1-D token tensor."""
    rows = windows(ids, ctx, max_windows)
    if rows.shape[0] == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {ctx}")
    device = next(model.parameters()).device
    total_nll, total_tok = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total_nll += float(nll)
        total_tok += batch[:, 1:].numel()
        if progress:
            progress(batch.shape[0])
    model.train(was_training)
    mean = total_nll / total_tok
    return {"ppl": math.exp(mean), "nll": mean, "windows": int(rows.shape[0]), "tokens": total_tok, "ctx": ctx}
