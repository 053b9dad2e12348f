"""Self-distillation from the dense teacher (core/objective.py): the chunked objective equals the
model's own loss and a slow full-logits reference, the teacher really is the dense base model while
masks are closed, the KL is exactly zero for a fresh adapter on an unpruned model, and no weight is
ever copied."""
import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from loraprune.core.arch import TARGET_MODULES, model_spec
from loraprune.core.criteria.activation import InputSquares
from loraprune.core.element_masks import ElementMasks
from loraprune.core.masked_lora import attach
from loraprune.core.masks import MaskSet
from loraprune.core.objective import LmObjective, dense_teacher
from loraprune.core.patterns import parse_pattern
from test_export import random_masks


def lora(model, perturb=True, seed=0):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, lora_dropout=0.0))
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def batch(vocab, n=2, t=17, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_ce_objective_equals_the_models_own_loss_and_gradients():
    model = lora(tiny_model())
    x = batch(model.config.vocab_size)
    ref = model(input_ids=x, labels=x).loss
    ref.backward()
    want = lora_grads(model)
    model.zero_grad(set_to_none=True)
    loss, parts = LmObjective(chunk=7)(model, x)  # a chunk that does not divide the 32 rows
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6) and parts["ce"] == pytest.approx(ref.item(), rel=1e-6)
    got = lora_grads(model)
    assert got.keys() == want.keys() and want
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-7), k


def closed_model(seed=0):
    """A dense copy, and a LoRA model (B perturbed) whose unit masks and 2:4 element masks are closed,
    with an activation recorder watching every projection."""
    dense = tiny_model(seed=seed).eval()
    model = lora(copy.deepcopy(dense), seed=seed)
    spec = model_spec(model.config)
    masks = random_masks(spec, [0.5, 0.25], seed=seed)
    masks.attach(model)
    em = ElementMasks.for_model(model, spec.num_layers, parse_pattern("2:4"))
    g = torch.Generator().manual_seed(seed)
    for k in em.keep:
        em.keep[k].copy_(torch.rand(em.keep[k].shape, generator=g) > 0.5)
    attach(model, em)
    rec = InputSquares()
    rec.watch(model, list(em.keep))
    return dense, model, masks, em, rec


def test_teacher_is_the_dense_base_model_while_masks_are_closed():
    dense, model, masks, em, rec = closed_model()
    x = batch(model.config.vocab_size)
    with torch.no_grad():
        want = dense(input_ids=x).logits
        student = model(input_ids=x).logits
        rec.sq = {}
        gates = [g.clone() for g in masks.gate_parameters()]
        with dense_teacher(model, masks, em):
            teacher = model(input_ids=x).logits
        assert rec.sq == {}                                   # no criterion saw the teacher's activations
        assert all(torch.equal(a, b) for a, b in zip(gates, masks.gate_parameters()))  # masks restored
        again = model(input_ids=x).logits
    assert (student - want).abs().max() > 1e-2                 # the student really is pruned
    assert torch.allclose(teacher, want, atol=1e-6, rtol=0), (teacher - want).abs().max()
    assert torch.equal(again, student)                        # and is again after the teacher ran


def test_kl_is_exactly_zero_for_a_fresh_adapter_on_an_unpruned_model():
    model = lora(tiny_model(), perturb=False)                 # B = 0: LoRA adds exactly nothing
    masks = MaskSet(model_spec(model.config))
    masks.attach(model)                                       # ratio 0: every gate is 1
    x = batch(model.config.vocab_size)

    def teacher(m):
        return dense_teacher(m, masks)

    loss, parts = LmObjective(alpha=1.0, temperature=2.0, teacher=teacher)(model, x)
    loss.backward()
    assert parts["kl"] == 0.0 and loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in lora_grads(model).values())  # KL adds no gradient
    model.zero_grad(set_to_none=True)
    LmObjective(alpha=0.5, temperature=2.0, teacher=teacher)(model, x)[0].backward()
    half = lora_grads(model)
    model.zero_grad(set_to_none=True)
    LmObjective()(model, x)[0].backward()
    ce = lora_grads(model)
    assert ce and all(torch.equal(half[k], 0.5 * ce[k]) for k in ce)  # exactly half the CE gradient


def test_distillation_loss_equals_a_slow_reference():
    dense, model, masks, em, rec = closed_model(seed=3)
    rec.close()
    x = batch(model.config.vocab_size, seed=4)
    a, T = 0.7, 2.0
    loss, parts = LmObjective(alpha=a, temperature=T, chunk=5, teacher=lambda m: dense_teacher(m, masks, em))(model, x)
    loss.backward()
    got = lora_grads(model)
    model.zero_grad(set_to_none=True)
    z = model(input_ids=x).logits[:, :-1].reshape(-1, model.config.vocab_size).float()   # full logits
    with torch.no_grad():
        zt = dense(input_ids=x).logits[:, :-1].reshape(-1, model.config.vocab_size).float()
    y = x[:, 1:].reshape(-1)
    ce = F.cross_entropy(z, y)
    kl = (F.softmax(zt / T, -1) * (F.log_softmax(zt / T, -1) - F.log_softmax(z / T, -1))).sum(-1).mean()
    ref = (1 - a) * ce + a * T * T * kl
    ref.backward()
    want = lora_grads(model)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(ce.item(), rel=1e-5) and parts["kl"] == pytest.approx(kl.item(), rel=1e-4)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-6), (k, (got[k] - want[k]).abs().max())


def _big_tensors(min_numel):
    out = []
    with warnings.catch_warnings():  # probing every live object touches deprecated module attributes
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if torch.is_tensor(obj) and obj.numel() >= min_numel:
                    out.append(obj.untyped_storage().data_ptr())
            except Exception:  # noqa: BLE001  (gc hands out objects in any state)
                continue
    return set(out)


def test_no_weight_is_duplicated_by_the_teacher():
    model = lora(tiny_model(vocab=2000), perturb=False)       # the embedding is the largest weight
    masks = MaskSet(model_spec(model.config))
    masks.attach(model)
    biggest = max(p.numel() for p in model.parameters())
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    obj = LmObjective(alpha=0.5, temperature=2.0, teacher=lambda m: dense_teacher(m, masks))
    gc.collect()
    before = _big_tensors(biggest)
    seen = []
    hook = model.get_base_model().model.norm.register_forward_hook(lambda *a: seen.append(_big_tensors(biggest)))
    loss, _ = obj(model, batch(2000))
    loss.backward()
    hook.remove()
    assert len(seen) == 2                                     # the teacher's forward and the student's
    assert all(s <= before for s in seen)                     # no weight-sized tensor appeared in either
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == storages
    assert not any(torch.is_tensor(v) or isinstance(v, torch.nn.Module) for v in vars(obj).values())


@pytest.mark.parametrize("criterion,schedule", [("lora", "iterative"), ("mask-taylor", "iterative"),
                                                ("taylor", "oneshot"), ("activation", "iterative"),
                                                ("magnitude", "oneshot"), ("random", "oneshot")])
def test_every_criterion_and_schedule_trains_with_distillation(criterion, schedule, tiny_model_dir, text_file,
                                                               tmp_path):
    from loraprune.core.config import PruneConfig
    from loraprune.run import prune

    cfg = PruneConfig(model=str(tiny_model_dir()), data=str(text_file), eval_data=str(text_file), eval_ctx=32,
                      eval_windows=1, seq_len=32, batch_size=2, steps=6, prune_every=1, calib_batches=2,
                      ratio=0.5, criterion=criterion, schedule=schedule, skip_layers="none", export=False,
                      save_every=0, distill_alpha=0.5, distill_temp=2.0, out=str(tmp_path / "run"))
    rep = prune(cfg)
    parts = rep["loss_parts"]
    assert set(parts) == {"ce", "kl"} and len(parts["kl"]) == 6
    assert all(k >= 0 for k in parts["kl"]) and parts["kl"][-1] > 0      # pruned: the student differs
    for loss, ce, kl in zip(rep["losses"], parts["ce"], parts["kl"]):
        assert loss == pytest.approx(0.5 * ce + 0.5 * 4.0 * kl, rel=1e-5)
    assert all(l["ffn"] == 48 for l in rep["layers"])


def test_element_pattern_with_distillation(tiny_model_dir, text_file, tmp_path):
    from loraprune.core.config import PruneConfig
    from loraprune.run import prune

    cfg = PruneConfig(model=str(tiny_model_dir()), data=str(text_file), eval_windows=0, seq_len=32, batch_size=2,
                      steps=6, prune_every=1, pattern="2:4", criterion="wanda", schedule="oneshot", calib_batches=2,
                      export=True, save_every=0, distill_alpha=0.5, out=str(tmp_path / "run"))
    rep = prune(cfg)
    assert rep["sparsity"]["verified"]["ok"] and rep["loss_parts"]["kl"][0] > 0
