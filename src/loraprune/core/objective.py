"""The training objective: a pluggable piece, chosen by config, so the loop does not change when the
loss does.

Contract: `objective(model, batch) -> (loss, parts)`, loss a scalar tensor to backpropagate
(one micro-batch, not yet divided by grad_accum), parts a dict of plain floats for the report
(e.g. {"ce": 3.1, "kl": 0.2}). `name` identifies it in reports.

`LmObjective` runs the decoder once for the final hidden states and computes the head and the loss
in row chunks (core/lm_loss.py), so the [batch, seq, vocab] logits never exist. With
`--distill-alpha a > 0` it distils from the dense teacher: the same frozen weights with LoRA
disabled (peft's `disable_adapter()`), every unit gate open and every element mask bypassed, run
under no_grad on the same batch -- no second copy of any weight.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from .arch import unwrap
from .criteria.activation import InputSquares
from .lm_loss import lm_loss


@contextmanager
def dense_teacher(model, masks=None, element_masks=None):
    """Inside: `model` computes the dense base model (no LoRA, no unit mask, no element mask) and no
    criterion records activations. Every switch is restored on exit."""
    with ExitStack() as stack:
        if hasattr(model, "disable_adapter"):  # a peft model
            stack.enter_context(model.disable_adapter())
        if masks is not None:
            stack.enter_context(masks.opened())
        if element_masks is not None:
            stack.enter_context(element_masks.bypassed())
        stack.enter_context(InputSquares.paused())
        yield


class LmObjective:
    """(1 - a) * CE + a * T^2 * KL(teacher_T || student_T) over next-token distributions, a = alpha."""

    def __init__(self, alpha: float = 0.0, temperature: float = 1.0, chunk: int = 1024, teacher=None):
        if alpha and teacher is None:
            raise ValueError("distillation (alpha > 0) needs a teacher context")
        self.alpha, self.temperature, self.chunk, self.teacher = float(alpha), float(temperature), chunk, teacher
        self.name = "ce+kl" if self.alpha else "ce"

    def __call__(self, model, batch):
        base = unwrap(model)
        decoder, head = base.model, base.lm_head
        if head.bias is not None:
            raise ValueError("the chunked head expects an lm_head without bias (LLaMA-family models)")
        teacher_hidden = None
        if self.alpha:
            # First, and under no_grad: the teacher opens the unit gates in place, which the student's
            # autograd graph must not see change between its forward and its backward.
            with torch.no_grad(), self.teacher(model):
                teacher_hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
            teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]   # [B, T-1, H]
        targets = batch[:, 1:].reshape(-1)                                  # [B*(T-1)]
        loss, parts = lm_loss(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets,
                              teacher_hidden=teacher_hidden, alpha=self.alpha,
                              temperature=self.temperature, chunk=self.chunk)
        return loss, {k: v for k, v in parts.items() if v is not None}


def build_objective(cfg, teacher=None) -> LmObjective:
    """The objective a PruneConfig asks for; `teacher(model)` is the dense-teacher context."""
    return LmObjective(cfg.distill_alpha, cfg.distill_temp, cfg.head_chunk,
                       teacher if cfg.distill_alpha else None)
