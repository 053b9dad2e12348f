"""The chunked LM loss (core/lm_loss.py) against a slow full-logits reference: values, gradients,
exact zeros when teacher == student, no [N, V] tensor alive, bf16, all rows ignored."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from loraprune.core.lm_loss import lm_loss


def make(N=37, H=16, V=300, n_ignore=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    teacher = (hidden.float() + 0.5 * torch.randn(N, H, generator=g)).to(dtype)
    weight = torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignore]] = -100
    return hidden, teacher, weight, targets


def reference(hidden, weight, targets, teacher, alpha, T):
    """Slow obvious version: full [N, V] logits + autograd."""
    z = hidden.float() @ weight.float().T
    ce = F.cross_entropy(z, targets, ignore_index=-100)
    if alpha == 0:
        return ce, ce, None
    with torch.no_grad():  # teacher is a fixed target: no gradient through the shared weight
        zt = teacher.float() @ weight.float().T
    m = targets != -100
    pt, lpt, lqs = F.softmax(zt / T, -1), F.log_softmax(zt / T, -1), F.log_softmax(z / T, -1)
    kl = (pt * (lpt - lqs)).sum(-1)[m].mean()
    return (1 - alpha) * ce + alpha * T * T * kl, ce, kl


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run(fn, hidden, weight, **kw):
    h = hidden.clone().requires_grad_(True)
    out = fn(h, weight, **kw)
    loss = out[0]
    loss.backward()
    return out, h.grad


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [8, 64])
def test_matches_reference(alpha, T, chunk):
    hidden, teacher, weight, targets = make()
    (loss, parts), g = run(lm_loss, hidden, weight, targets=targets, teacher_hidden=teacher,
                           alpha=alpha, temperature=T, chunk=chunk)
    (rloss, rce, rkl), rg = run(lambda h, w, **k: reference(h, w, targets, teacher, alpha, T),
                                hidden, weight)
    assert abs(loss.item() - rloss.item()) <= 1e-6 * abs(rloss.item()) + 1e-7
    assert parts["ce"] == pytest.approx(rce.item(), rel=1e-6)
    if alpha == 0:
        assert parts["kl"] is None
    else:
        assert parts["kl"] == pytest.approx(rkl.item(), rel=1e-5) and parts["kl"] > 0.01
    assert rel_err(g, rg) < 1e-5
    assert g[targets == -100].abs().max() == 0  # ignored rows get exactly no gradient


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_weight_grad(alpha):
    hidden, teacher, weight, targets = make()
    w1 = weight.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    (loss, _), g = run(lm_loss, hidden, w1, targets=targets, teacher_hidden=teacher,
                       alpha=alpha, temperature=2.0, chunk=8)
    (rloss, _, _), rg = run(lambda h, w: reference(h, w, targets, teacher, alpha, 2.0), hidden, w2)
    assert rel_err(w1.grad, w2.grad) < 1e-5 and rel_err(g, rg) < 1e-5
    # Frozen weight: no grad computed or returned.
    wf = weight.clone()
    run(lm_loss, hidden, wf, targets=targets, teacher_hidden=teacher, alpha=alpha, chunk=8)
    assert wf.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_teacher_equal_student_is_exact(dtype, T):
    hidden, _, weight, targets = make(dtype=dtype)
    kw = dict(targets=targets, teacher_hidden=hidden.clone(), temperature=T, chunk=8)
    (l0, p0), g0 = run(lm_loss, hidden, weight, **{**kw, "alpha": 0.0})
    (l5, p5), g5 = run(lm_loss, hidden, weight, **{**kw, "alpha": 0.5})
    (l1, p1), g1 = run(lm_loss, hidden, weight, **{**kw, "alpha": 1.0})
    assert p5["kl"] == 0.0 and p1["kl"] == 0.0
    assert l1.item() == 0.0 and torch.count_nonzero(g1) == 0  # KL-only gradient: exactly zero
    # Guaranteed bitwise (alpha = 0.5 is a power-of-two scale, no underflow in practice):
    assert l5.item() == 0.5 * l0.item()
    assert torch.equal(g5, 0.5 * g0)


def test_no_logits_saved_or_materialised():
    N, H, V, chunk = 64, 8, 5000, 16
    hidden, teacher, weight, targets = make(N=N, H=H, V=V, n_ignore=0)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    class MaxNumel(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    self.max = max(self.max, o.numel())
            return out

    for w in (weight.clone(), weight.clone().requires_grad_(True)):
        saved.clear()
        h = hidden.clone().requires_grad_(True)
        mode = MaxNumel()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
            loss, _ = lm_loss(h, w, targets, teacher_hidden=teacher, alpha=0.5, chunk=chunk)
            loss.backward()
        assert mode.max == chunk * V  # one chunk of logits is the largest tensor ever created
        assert saved, "hooks saw nothing"
        with_v = [s for s in saved if V in s]
        assert with_v == ([] if not w.requires_grad else [(V, H)])  # only grad_weight buffer


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_bf16_hidden(wdtype):
    hidden, teacher, weight, targets = make(dtype=torch.bfloat16)
    weight = weight.to(wdtype)
    (loss, parts), g = run(lm_loss, hidden, weight, targets=targets, teacher_hidden=teacher,
                           alpha=0.5, temperature=2.0, chunk=8)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    (rloss, _, _), rg = run(lambda h, w: reference(h, w, targets, teacher, 0.5, 2.0),
                            hidden.float(), weight.float())
    # Computation is float32 on the upcast inputs: loss ~exact, grad within bf16 rounding.
    assert loss.item() == pytest.approx(rloss.item(), rel=1e-5)
    assert rel_err(g, rg) < 1e-2
    # Under autocast the internal matmuls must not drop to bf16: same result as without.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (la, _), ga = run(lm_loss, hidden, weight, targets=targets, teacher_hidden=teacher,
                          alpha=0.5, temperature=2.0, chunk=8)
    assert la.item() == loss.item() and torch.equal(ga, g)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_all_ignored(alpha):
    hidden, teacher, weight, targets = make()
    targets = torch.full_like(targets, -100)
    w = weight.clone().requires_grad_(True)
    (loss, parts), g = run(lm_loss, hidden, w, targets=targets, teacher_hidden=teacher,
                           alpha=alpha, chunk=8)
    assert loss.item() == 0.0 and parts["ce"] == 0.0
    assert torch.count_nonzero(g) == 0 and torch.count_nonzero(w.grad) == 0
    assert not torch.isnan(g).any()
