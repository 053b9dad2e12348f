"""Perplexity over non-overlapping windows: the one protocol used everywhere in loraprune.

The token stream is cut into windows of `ctx` tokens (the tail shorter than ctx is dropped);
each window is scored independently (no carried context, no BOS added); PPL = exp(mean NLL over
every predicted token of every window used), i.e. ctx - 1 predictions per window. With
`max_windows=K` only the first K windows are scored (the result says how many were used and how
many the text has). Batching changes only speed: every row is a full window, so there is no padding.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def windows(ids: torch.Tensor, ctx: int, max_windows: int | None = None) -> torch.Tensor:
    """[n_tokens] -> [n_windows, ctx], the first K windows when max_windows=K."""
    n = ids.numel() // ctx
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * ctx].view(n, ctx)


def _exp(mean_nll: float) -> float:
    if math.isnan(mean_nll):
        return float("nan")
    return math.exp(mean_nll) if mean_nll < 709.0 else float("inf")  # exp overflows past ~709.78


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int = 512, max_windows: int | None = None,
               batch_size: int = 1, progress=None) -> dict:
    """Return {"ppl", "nll", "windows", "windows_available", "tokens", "ctx"} for a 1-D token tensor.

    "tokens" counts scored predictions (windows * (ctx - 1)). `progress(n)` is called after each
    batch with the number of windows just scored. A non-finite loss is reported (logged and returned
    as nan/inf), never dropped.
    """
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2 tokens, got {ctx}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = ids.reshape(-1)
    rows = windows(ids, ctx, max_windows)                     # [n, ctx]
    if rows.shape[0] == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {ctx}")
    device = next(model.parameters()).device
    total_nll, total_tok = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start:start + batch_size].to(device)        # [b, ctx]
            logits = model(input_ids=batch).logits.float()           # [b, ctx, vocab]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tok += batch[:, 1:].numel()
            if progress:
                progress(batch.shape[0])
    finally:
        model.train(was_training)
    mean = total_nll / total_tok
    if not math.isfinite(mean):
        log.warning("perplexity: the mean NLL is %s (the model produced non-finite logits)", mean)
    return {"ppl": _exp(mean), "nll": mean, "windows": int(rows.shape[0]),
            "windows_available": int(ids.numel() // ctx), "tokens": total_tok, "ctx": ctx}
