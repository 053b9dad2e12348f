"""The language-model loss without the full logits: cross-entropy and, optionally, self-distillation
from a teacher, computed in row chunks so that no [tokens, vocab] tensor ever exists.

    loss = (1 - a) * CE + a * T^2 * KL(p_teacher,T || q_student,T)     (means over non-ignored rows)

Forward computes the loss *and* its analytic gradient chunk by chunk (dCE/dz = softmax(z) - onehot,
d(T^2 KL)/dz = T (q_s - p_t)); backward only rescales the stored [N, H] gradient. Peak extra
memory: a few [chunk, V] float32 temporaries, one [N, H] gradient buffer (and a [V, H] one if the
head weight trains). Teacher and student logits go through the same code, so bitwise-equal hidden
states give a KL of exactly 0 and an exactly-zero gradient (tests/test_lm_loss.py).
"""
from __future__ import annotations

import torch

IGNORE = -100


def _logits(h, w32):
    # h [c, H] any float dtype -> z [c, V] float32. Used for student AND teacher, so bitwise-equal
    # hidden states give bitwise-equal logits (same kernel, same shapes).
    return h.float() @ w32.T


def _log_softmax_t(z, temperature):
    # [c, V] -> [c, V]. One code path for both sides of the KL: if z_teacher == z_student bitwise,
    # log p_t == log q_s bitwise, hence KL and its gradient are exactly 0.
    return torch.log_softmax(z / temperature, dim=-1)


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, alpha, temperature, chunk):
        # params: an autograd.Function takes every input positionally (backward returns one grad each)
        # Matmuls must stay in float32 even if the caller runs under (CPU/CUDA) autocast.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return _ChunkedLMLoss._fwd(ctx, hidden, weight, targets, teacher_hidden,
                                       alpha, temperature, chunk)

    @staticmethod
    def _fwd(ctx, hidden, weight, targets, teacher_hidden, alpha, T, chunk):
        # params: forward's inputs, unchanged
        need_gw = ctx.needs_input_grad[1]
        w32 = weight.float()                           # [V, H]; no copy if already float32
        grad_h = torch.zeros_like(hidden)              # [N, H] in hidden's dtype
        grad_w = torch.zeros_like(w32) if need_gw else None  # [V, H] float32 accumulator
        # Only non-ignored rows do any work; ignored rows keep a zero gradient.
        rows = (targets != IGNORE).nonzero().squeeze(1)  # [N_valid]
        n_valid = rows.numel()
        use_kl = alpha != 0.0
        w_ce = 1.0 - alpha                             # weight of the CE term
        ce_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        inv_n = 1.0 / max(n_valid, 1)                  # mean over valid rows (0 rows -> loss 0)
        for s in range(0, n_valid, chunk):
            idx = rows[s:s + chunk]                    # [c]
            h = hidden.index_select(0, idx)            # [c, H]
            tgt = targets.index_select(0, idx)[:, None]  # [c, 1]
            z = _logits(h, w32)                        # [c, V] float32 student logits
            dz = None                                  # [c, V] dLoss/dz (before the 1/N scale)
            if use_kl:
                lt = _log_softmax_t(_logits(teacher_hidden.index_select(0, idx), w32), T)  # [c, V]
                ls = _log_softmax_t(z, T)              # [c, V]
                pt = lt.exp()                          # [c, V] teacher probs
                # KL rows = sum_v p_t (log p_t - log q_s); in place in lt (no longer needed).
                # Row sums in float32 ([c]); sum(dtype=float64) would copy [c, V] to float64 on CPU.
                kl_sum += lt.sub_(ls).mul_(pt).sum(dim=1).double().sum()
                del lt
                # d(T^2 KL)/dz = T * (q_s - p_t); computed in place in ls's storage.
                dz = ls.exp_().sub_(pt).mul_(alpha * T)
                del ls, pt                             # drop names so buffers die with dz
            logp = torch.log_softmax(z, dim=-1)        # [c, V]; z no longer needed after this
            del z
            ce_sum -= logp.gather(1, tgt).sum(dtype=torch.float64)
            if w_ce != 0.0:
                # dCE/dz = softmax(z) - onehot(target), weighted by (1 - alpha); in place in logp.
                logp.exp_().scatter_add_(1, tgt, torch.full_like(tgt, -1.0, dtype=logp.dtype))
                logp.mul_(w_ce)
                dz = logp if dz is None else logp.add_(dz)
            del logp                                   # (a live name would keep [c, V] alive)
            dz.mul_(inv_n)
            grad_h.index_copy_(0, idx, (dz @ w32).to(hidden.dtype))  # [c, H]
            if need_gw:
                grad_w.addmm_(dz.T, h.float())         # [V, c] @ [c, H] -> [V, H]
            del dz
        ce = (ce_sum * inv_n).float()
        kl = (kl_sum * inv_n).float()
        # A fresh tensor (not ce itself, which is marked non-differentiable). alpha == 0: kl == 0.
        loss = w_ce * ce + (alpha * T * T) * kl
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _g_ce, _g_kl):
        grad_h, grad_w = ctx.saved_tensors
        # grad_loss is a 0-dim float32 tensor; 0-dim operands don't change the result dtype.
        gh = grad_h * grad_loss
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def lm_loss(hidden, weight, targets, *, teacher_hidden=None, alpha=0.0, temperature=1.0,
            chunk=1024):
    """hidden [N, H] student final hidden states; weight [V, H] lm_head weight (shared with the
    teacher); targets [N] long, -100 = ignore; teacher_hidden [N, H] or None (needed if alpha > 0).
    loss = (1 - alpha) * CE + alpha * T^2 * KL(p_t,T || q_s,T), both means over non-ignored rows.
    Returns (loss, {"ce": float, "kl": float or None})."""
    alpha, temperature = float(alpha), float(temperature)
    if alpha != 0.0:
        if teacher_hidden is None:
            raise ValueError("alpha > 0 needs teacher_hidden")
        teacher_hidden = teacher_hidden.detach()
    else:
        teacher_hidden = None
    loss, ce, kl = _ChunkedLMLoss.apply(hidden, weight, targets, teacher_hidden,
                                        alpha, temperature, int(chunk))
    return loss, {"ce": ce.item(), "kl": kl.item() if alpha != 0.0 else None}
