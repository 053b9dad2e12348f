"""The training objective: a pluggable piece, chosen by config, so the loop does not change when the
loss does.

Contract: `objective(model, batch) -> (loss, parts)`, loss a scalar tensor to backpropagate
(one micro-batch, not yet divided by grad_accum), parts a dict of plain floats for the report
(e.g. {"ce": 3.1}). `name` identifies it in reports.
"""
from __future__ import annotations


class CrossEntropy:
    """Next-token cross-entropy as the model computes it (`model(input_ids, labels=input_ids).loss`:
    mean over the batch's predicted tokens, logits upcast to fp32)."""

    name = "ce"

    def __call__(self, model, batch):
        loss = model(input_ids=batch, labels=batch).loss
        return loss, {"ce": float(loss.detach())}


def build_objective(cfg, masks=None):
    """The objective a PruneConfig asks for."""
    return CrossEntropy()
