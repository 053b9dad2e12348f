"""Semi-structured (N:M) and unstructured pruning: selection, schedule, masked LoRA, criteria, export
and verification, each against a slow explicit reference (tiny seeded models, 1 thread)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_model
from loraprune.core.arch import TARGET_MODULES, layer_modules, model_spec
from loraprune.core.config import PruneConfig
from loraprune.core.lora import lora_parts
from loraprune.core.criteria.element import ElementScorer, LoraElementScorer, WandaElementScorer
from loraprune.core.element_pruning import ElementPruning
from loraprune.core.schedule import Ramp
from loraprune.errors import UserError
from loraprune.core.masked_lora import MaskedMergedLinear, attach
from loraprune.core.masks import MaskSet
from loraprune.core.element_masks import ElementMasks, structural_keep
from loraprune.core.selection import n_removed
from loraprune.core.patterns import parse_pattern
from loraprune.core.selection import prune_selection

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lora_model(seed=0, **kw):
    model = tiny_model(seed=seed, **kw)
    torch.manual_seed(seed + 1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, lora_dropout=0.0))
    with torch.no_grad():  # B = 0 at init would hide every LoRA term
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return peft


def batch(model, seed=0, n=2, t=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=g)


def random_unit_masks(model, ratio=0.5, seed=0):
    spec = model_spec(model.config)
    ms = MaskSet(spec)
    g = torch.Generator().manual_seed(seed)
    for i in ms.prunable:
        s = spec.layers[i]
        scores = {"heads": torch.rand(s.num_heads, generator=g), "kv": torch.rand(s.num_kv_heads, generator=g),
                  "ffn": torch.rand(s.intermediate_size, generator=g)}
        ms.update_layer(i, ratio, ratio, scores, ["heads", "ffn"], round_to=4)
    return ms


def random_element_masks(model, pattern, unit_masks=None, seed=0, group="module"):
    em = ElementMasks.for_model(model, model_spec(model.config).num_layers, pattern, group)
    g = torch.Generator().manual_seed(seed)
    for key, k in em.keep.items():
        em.update(key, torch.rand(k.shape, generator=g), 1.0, unit_masks)
    return em


def masked_2to4_model(seed, **kw):
    """A LoRA model whose projections run the masked-LoRA forward under random 2:4 masks."""
    model = lora_model(seed=seed, **kw)
    em = random_element_masks(model, parse_pattern("2:4"))
    attach(model, em)
    return model, em


# ---- selection and schedule against explicit loops ------------------------------------------------
def slow_nm(scores, n, m, cols=None):
    """Loop over rows and blocks of M kept columns: prune the n lowest (ties: first position)."""
    out_f, in_f = scores.shape
    cols = list(range(in_f)) if cols is None else cols.nonzero().flatten().tolist()
    keep = torch.ones(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        for b in range(0, len(cols), m):
            block = cols[b:b + m]
            for c in sorted(block, key=lambda c: (float(scores[r, c]), c))[:n]:
                keep[r, c] = False
    return keep


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_selection_matches_slow_reference(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.rand(6, 32, generator=g)
    got = prune_selection(scores, parse_pattern(f"{n}:{m}"), 1.0)
    assert torch.equal(got, slow_nm(scores, n, m))
    cols = torch.rand(32, generator=g) < 0.6
    cols[cols.nonzero().flatten()[: int(cols.sum()) % m]] = False  # a multiple of m kept columns
    got = prune_selection(scores, parse_pattern(f"{n}:{m}"), 1.0, cols=cols)
    assert torch.equal(got, slow_nm(scores, n, m, cols))
    assert got[:, ~cols].all()  # structurally removed columns are left alone


def test_unstructured_selection_module_and_row():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 12, generator=g)
    p = parse_pattern("unstructured", 0.4)
    got = prune_selection(scores, p, 1.0, group="module")
    k = n_removed(0.4, 60)
    thresh = scores.flatten().sort().values[k - 1]
    assert int((~got).sum()) == k and torch.equal(~got, scores <= thresh)
    got = prune_selection(scores, p, 1.0, group="row")
    for r in range(5):
        lowest = scores[r].argsort()[: n_removed(0.4, 12)]
        assert set((~got[r]).nonzero().flatten().tolist()) == set(lowest.tolist())


class RandomScorer(ElementScorer):
    """Fresh random scores at every update (the worst case for monotonicity)."""
    name, needs_backward, group = "random", False, "module"

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def observe(self, model, keys):
        pass

    def scores(self, model, key):
        return torch.rand(self.shape[key], generator=self.g)


@pytest.mark.parametrize("pattern,total,every", [("2:4", 20, 3), ("4:8", 17, 2), ("unstructured", 20, 3)])
def test_schedule_reaches_final_pattern_exactly_and_only_shrinks(pattern, total, every):
    model = tiny_model()
    p = parse_pattern(pattern, 0.5)
    em = ElementMasks.for_model(model, 2, p)
    sc = RandomScorer()
    sc.shape = {k: v.shape for k, v in em.keep.items()}
    pr = ElementPruning(em, sc, Ramp(total, prune_every=every, warmup_frac=0.1, cooldown_frac=0.2))
    prev = {k: v.clone() for k, v in em.keep.items()}
    levels = []
    for step in range(1, total + 1):
        if pr.maybe_update(model, step):
            levels.append(pr.level)
            for key, k in em.keep.items():
                assert not (k & ~prev[key]).any(), "a pruned weight came back"
                if p.kind == "nm":
                    zeros = (~k).view(k.shape[0], -1, p.m).sum(-1)
                    assert (zeros == n_removed(pr.level, p.n)).all()  # the same count in every block
                else:
                    assert int((~k).sum()) == n_removed(pr.level * p.sparsity, k.numel())
                prev[key] = k.clone()
    pr.finalize(model, total)
    assert levels[-1] == 1.0 and levels == sorted(levels) and len(levels) >= 3
    if p.kind == "nm":  # the number pruned per block rises step by step: 0 -> ... -> N
        assert sorted({n_removed(x, p.n) for x in levels})[-1] == p.n
    for k in em.keep.values():
        if p.kind == "nm":
            assert ((~k).view(k.shape[0], -1, p.m).sum(-1) == p.n).all()
        else:
            assert int((~k).sum()) == n_removed(p.sparsity, k.numel())


# ---- masked LoRA ----------------------------------------------------------------------------------
def reference_masked_linear(x, W, b, A, B, keep, s):
    return torch.nn.functional.linear(x, (W + (B @ A) * s).masked_fill(~keep, 0), b)


@pytest.mark.parametrize("bias", [False, True])
def test_masked_lora_function_gradients_equal_autograd(bias):
    g = torch.Generator().manual_seed(1)
    out_f, in_f, r = 6, 8, 3
    x = torch.randn(2, 5, in_f, generator=g, dtype=torch.float64)
    W = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    b = torch.randn(out_f, generator=g, dtype=torch.float64) if bias else None
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    keep = prune_selection(torch.rand(out_f, in_f, generator=g), parse_pattern("2:4"), 1.0)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B)] + ([b.clone().requires_grad_(True)] if bias else [])
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, A, B)] + ([b.clone().requires_grad_(True)] if bias else [])
    y = MaskedMergedLinear.apply(leaves[0], W, leaves[3] if bias else None, leaves[1], leaves[2], keep, 2.0,
                                 torch.float64)
    y_ref = reference_masked_linear(ref_leaves[0], W, ref_leaves[3] if bias else None, ref_leaves[1],
                                    ref_leaves[2], keep, 2.0)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-12)
    for a, b_ in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b_.grad, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda x_, A_, B_: MaskedMergedLinear.apply(x_, W, b, A_, B_, keep, 2.0, torch.float64),
        (x.clone().requires_grad_(True), A.clone().requires_grad_(True), B.clone().requires_grad_(True)))


@pytest.mark.parametrize("pattern,ratio", [("2:4", 0.0), ("unstructured", 0.0), ("2:4", 0.5), ("unstructured", 0.5)])
def test_masked_training_forward_equals_exported_forward(pattern, ratio):
    from loraprune.export.compact import build_compact_model

    model = lora_model(seed=2)
    spec = model_spec(model.config)
    ids = batch(model)
    unit = random_unit_masks(model, ratio) if ratio else MaskSet(spec)
    unit.attach(model)
    model.eval()
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    em = random_element_masks(model, parse_pattern(pattern, 0.5), unit if ratio else None)
    attach(model, em)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        compact = build_compact_model(model, unit, element_masks=em)
        exported = compact(input_ids=ids).logits
    assert (masked - unmasked).abs().max() > 1e-2          # the masks matter
    assert torch.allclose(masked, exported, atol=2e-5), float((masked - exported).abs().max())
    for i in range(spec.num_layers):  # the exported weights are exactly zero where the masks say
        for name, mod in layer_modules(compact, i).items():
            rows, cols = structural_keep(unit, i, name)
            k = em.keep[(i, name)]
            k = k[rows] if rows is not None else k
            k = k[:, cols] if cols is not None else k
            assert torch.equal(mod.weight == 0, ~k)


def test_masked_weights_get_no_gradient_and_training_keeps_zeros():
    model, em = masked_2to4_model(seed=3)
    model.train()
    ids = batch(model)
    model(input_ids=ids, labels=ids).loss.backward()
    for (i, name), keep in em.keep.items():
        mod = layer_modules(model, i)[name]
        _p = lora_parts(mod)
        W, A, B, s = _p.weight, _p.A, _p.B, _p.scaling
        # every masked module still trains its LoRA factors (their values are checked against
        # autograd in test_masked_lora_function_gradients_equal_autograd)
        assert A.grad is not None and B.grad is not None
        assert float(A.grad.abs().sum()) > 0
    # a masked weight's merged value can be anything: the forward still sees zero
    mod = layer_modules(model, 0)["q_proj"]
    x = torch.randn(3, mod.in_features)
    _p = lora_parts(mod)
    W, A, B, s = _p.weight, _p.A, _p.B, _p.scaling
    ref = reference_masked_linear(x, W, None, A, B, em.keep[(0, "q_proj")], s)
    assert torch.allclose(mod(x), ref, atol=1e-6)


def test_masked_lora_under_bf16_autocast():
    """The big matmuls run in bf16, W_eff is formed in fp32, LoRA gradients stay fp32 and close to fp32."""
    model, _ = masked_2to4_model(seed=6)
    model.train()
    ids = batch(model)
    model(input_ids=ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for n, p in model.named_parameters():
        if n in ref:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref[n].flatten(), dim=0)
            assert cos > 0.9, n


# ---- criteria ---------------------------------------------------------------------------------------
def slow_lora_importance(mod):
    """Take the actual LoRA step A <- A - G_A, B <- B - G_B; the merged weight moves by G^; loop."""
    _p = lora_parts(mod)
    W, A, B, s = _p.weight, _p.A, _p.B, _p.scaling
    W, Ad, Bd = W.detach().double(), A.detach().double(), B.detach().double()
    gA, gB = A.grad.double(), B.grad.double()
    merged = W + s * Bd @ Ad
    g_hat = merged - (W + s * (Bd - gB) @ (Ad - gA))
    out = torch.zeros_like(W)
    for o in range(W.shape[0]):
        for i in range(W.shape[1]):
            out[o, i] = (merged[o, i] * g_hat[o, i]) ** 2
    return out


def test_lora_element_criterion_with_ema_equals_slow_reference():
    model, em = masked_2to4_model(seed=4, heads=4, kv=2, hidden=16, inter=24)  # gradients come through
    # the masked forward, as in training
    sc = LoraElementScorer("squared", ema=0.9)
    keys = list(em.keep)
    refs = []
    for seed in (0, 1):
        model.zero_grad(set_to_none=True)
        ids = batch(model, seed)
        model(input_ids=ids, labels=ids).loss.backward()
        sc.observe(model, keys)
        refs.append({k: slow_lora_importance(layer_modules(model, k[0])[k[1]]) for k in keys})
    for k in keys:
        want = 0.9 * refs[0][k] + 0.1 * refs[1][k]
        got = sc.scores(model, k).double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), k
        assert float(got.sum()) > 0


def test_wanda_scores_and_selection_equal_explicit_computation():
    model = lora_model(seed=5)
    keys = [(i, n) for i in range(2) for n in TARGET_MODULES]
    seen = {}

    def grab(key):
        def hook(_m, args):
            seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        return hook
    handles = [layer_modules(model, i)[n].register_forward_pre_hook(grab((i, n))) for i, n in keys]
    sc = WandaElementScorer()
    sc.setup(model, keys)
    with torch.no_grad():
        for seed in (0, 1):
            model(input_ids=batch(model, seed))
    for h in handles:
        h.remove()
    p = parse_pattern("2:4")
    for key in keys:
        mod = layer_modules(model, key[0])[key[1]]
        _p = lora_parts(mod)
        W, A, B, s = _p.weight, _p.A, _p.B, _p.scaling
        X = torch.cat(seen[key]).double()                                   # [tokens, in]
        want = torch.zeros(W.shape, dtype=torch.float64)
        for o in range(W.shape[0]):
            for j in range(W.shape[1]):
                w = float(W[o, j]) + s * float(B[o].detach().double() @ A[:, j].detach().double())
                want[o, j] = abs(w) * float(X[:, j].pow(2).sum().sqrt())
        got = sc.scores(model, key)
        assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6), key
        assert torch.equal(prune_selection(got, p, 1.0), slow_nm(got, 2, 4))  # N:M within blocks


# ---- end to end: prune, export, verify ---------------------------------------------------------------
def tiny_cfg(model_dir, text, out, **kw):
    base = dict(model=str(model_dir), data=str(text), eval_data=str(text), eval_ctx=32, eval_windows=2,
                seq_len=32, batch_size=2, steps=6, prune_every=1, skip_layers="none", save_every=0,
                threads=1, out=str(out))
    return PruneConfig(**{**base, **kw})


def explicit_pattern_check(model_dir, pattern, sparsity=0.5):
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    n_checked = 0
    for key, w in sd.items():
        if not any(f".{p}.weight" in key for p in TARGET_MODULES):
            continue
        n_checked += 1
        if pattern == "2:4":
            for row in w:
                for b in range(0, w.shape[1], 4):
                    assert int((row[b:b + 4] == 0).sum()) >= 2, key
        else:
            assert int((w == 0).sum()) == n_removed(sparsity, w.numel()), key
    return n_checked


@pytest.mark.parametrize("pattern,ratio,criterion,schedule", [
    ("2:4", None, "lora", "iterative"),
    ("unstructured", None, "lora", "iterative"),
    ("2:4", 0.5, "lora", "iterative"),
    ("2:4", None, "wanda", "oneshot"),
    ("2:4", 0.5, "wanda", "oneshot"),       # units by the activation criterion, then 2:4 by wanda
    ("unstructured", None, "magnitude", "oneshot"),
])
def test_prune_export_pattern_holds_after_merge(pattern, ratio, criterion, schedule, tiny_model_dir, text_file,
                                               tmp_path):
    from transformers import AutoModelForCausalLM

    from loraprune.export.verify import verify_sparsity
    from loraprune.run import prune

    out = tmp_path / "run"
    rep = prune(tiny_cfg(tiny_model_dir(), text_file, out, pattern=pattern, ratio=ratio, criterion=criterion,
                         schedule=schedule))
    assert explicit_pattern_check(out, pattern) == 14
    res = verify_sparsity(out)
    assert res["ok"] and res["modules_checked"] == 14 and res["sparsity_measured"] == pytest.approx(0.5)
    assert rep["sparsity"]["verified"]["ok"] and rep["sparsity"]["sparsity"] == pytest.approx(0.5)
    assert res["params"] == rep["params_pruned"]                      # the weight files only
    assert res["nonzero_params"] == rep["params_pruned"] - rep["sparsity"]["zeros"] == rep["sparsity"]["nonzero_params"]
    cfg = json.loads((out / "config.json").read_text())["loraprune_sparsity"]
    assert cfg["pattern"] == pattern and cfg["sparsity"] == 0.5
    assert (out / "element_masks.safetensors").is_file() and (out / "element_masks.json").is_file()
    if ratio:
        assert all(l["ffn"] == 48 and l["heads"] == 4 for l in rep["layers"])
    # the report's pruned PPL (masked model in training) is the exported model's PPL
    from loraprune.eval.ppl import perplexity
    from loraprune.run.prepare import load_eval_sets
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    (ids, _), = load_eval_sets(PruneConfig.from_file(str(out / "loraprune_config.json")), AutoTokenizer.from_pretrained(out))
    ppl = perplexity(model, ids, 32, 2)
    assert ppl["ppl"] == pytest.approx(rep["eval"]["pruned"]["ppl"], rel=1e-4)
    if schedule == "iterative":
        hist = rep["sparsity"]["history"]
        assert hist[-1]["level"] == 1.0 and len(hist) >= 3


def test_oneshot_without_recovery_and_export_command(tiny_model_dir, text_file, tmp_path):
    from loraprune.export.from_run import export_run
    from loraprune.export.verify import verify_sparsity
    from loraprune.run import prune

    out = tmp_path / "run"
    rep = prune(tiny_cfg(tiny_model_dir(), text_file, out, pattern="2:4", criterion="wanda", schedule="oneshot",
                         steps=0, calib_batches=2))
    assert rep["losses"] == [] and rep["sparsity"]["verified"]["ok"]
    info = export_run(str(out), str(tmp_path / "again"))
    assert verify_sparsity(tmp_path / "again")["ok"]
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert info["params"] == rep["params_pruned"]


def test_element_masks_roundtrip(tmp_path):
    model = tiny_model()
    em = random_element_masks(model, parse_pattern("unstructured", 0.3), group="row")
    em.save(tmp_path / "em.safetensors")
    back = ElementMasks.load(tmp_path / "em.safetensors")
    assert back.pattern == em.pattern and back.group == "row"
    assert all(torch.equal(back.keep[k], em.keep[k]) for k in em.keep)
    summary = json.loads((tmp_path / "em.json").read_text())
    assert summary["zeros"] == sum(int((~k).sum()) for k in em.keep.values())


# ---- flags --------------------------------------------------------------------------------------------
def test_flag_semantics():
    assert PruneConfig().ratio == 0.2 and PruneConfig().pattern == "structured" and PruneConfig().sparsity == 0
    c = PruneConfig(pattern="2:4")
    assert (c.ratio, c.sparsity) == (0.0, 0.5)
    assert PruneConfig(pattern="unstructured").sparsity == 0.5
    assert PruneConfig(pattern="unstructured", sparsity=0.7).sparsity == 0.7
    assert PruneConfig(pattern="2:4", ratio=0.2).round_to == 4       # kept channels: blocks of 4
    assert PruneConfig(pattern="2:4", ratio=0.2, round_to=6).round_to == 12
    assert PruneConfig(pattern="2:4", criterion="wanda").unit_criterion == "activation"
    assert PruneConfig(pattern="2:4", schedule="oneshot", steps=0).steps == 0
    again = PruneConfig.from_dict(PruneConfig(pattern="unstructured", ratio=0.3).to_dict())
    assert (again.pattern, again.ratio, again.sparsity) == ("unstructured", 0.3, 0.5)
    for kw in [dict(sparsity=0.5), dict(pattern="2:4", sparsity=0.3), dict(pattern="4:2"), dict(pattern="2of4"),
               dict(pattern="unstructured", sparsity=1.0), dict(pattern="2:4", criterion="taylor"),
               dict(criterion="wanda"), dict(pattern="2:4", lora_dropout=0.1), dict(steps=0, schedule="iterative"),
               dict(pattern=124)]:
        with pytest.raises(UserError):
            PruneConfig(**kw)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "loraprune", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_cli_prune_and_verify_sparsity(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    r = cli("prune", "--model", tiny_model_dir(), "--data", text_file, "--eval-windows", 0, "--seq-len", 32,
            "--batch-size", 2, "--steps", 4, "--prune-every", 1, "--threads", 1, "--pattern", "2:4", "--out", out)
    assert r.returncode == 0, r.stderr
    r = cli("verify-sparsity", out, "--json", tmp_path / "v.json")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "50.000%" in r.stdout
    assert json.loads((tmp_path / "v.json").read_text())["ok"]
    # break one block: exit 1, and the violation is named
    from safetensors.torch import load_file, save_file

    sd = load_file(str(out / "model.safetensors"))
    key = next(k for k in sd if k.endswith("mlp.down_proj.weight"))
    sd[key][0, :4] = 1.0
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = cli("verify-sparsity", out)
    assert r.returncode == 1 and "FAILED" in r.stdout and "down_proj" in r.stdout
    r = cli("verify-sparsity", tiny_model_dir())  # a dense model without metadata: bad input
    assert r.returncode == 2 and "loraprune_sparsity" in r.stderr
    r = cli("verify-sparsity", tiny_model_dir(), "--pattern", "2:4")  # dense: checked, fails
    assert r.returncode == 1
    r = cli("prune", "--model", tiny_model_dir(), "--data", text_file, "--pattern", "3:2", "--out", tmp_path / "x")
    assert r.returncode == 2 and "N:M" in r.stderr and not (tmp_path / "x").exists()


def test_fast_selection_equals_sort_reference():
    """kthvalue-based unstructured selection (with previously pruned entries preferred) against the
    argsort reference `lowest`, with many ties."""
    from loraprune.core.selection import lowest

    g = torch.Generator().manual_seed(7)
    p = parse_pattern("unstructured", 0.5)
    for trial in range(20):
        scores = torch.randint(0, 5, (6, 8), generator=g).float()        # ties everywhere
        keep = torch.rand(6, 8, generator=g) > (0.1 + 0.05 * (trial % 10))
        for frac in (0.3, 0.6, 1.0):
            k = n_removed(frac * 0.5, 48)
            want = ~lowest(scores.reshape(-1), k, (~keep).reshape(-1), dim=0).view(6, 8)
            got = prune_selection(scores, p, frac, keep=keep, group="module")
            assert torch.equal(got, want), (trial, frac)
            want = ~lowest(scores, n_removed(frac * 0.5, 8), None, dim=-1)
            assert torch.equal(prune_selection(scores, p, frac, group="row"), want)


def test_interrupted_sparse_run_resumes_to_the_same_result(tiny_model_dir, text_file, tmp_path):
    from loraprune.run import Hooks, prune
    from safetensors.torch import load_file

    model = tiny_model_dir()
    kw = dict(pattern="2:4", steps=8, prune_every=1, save_every=2, eval_windows=0, export=False)
    prune(tiny_cfg(model, text_file, tmp_path / "straight", **kw))

    class Stop(Exception):
        pass

    def on_step(step, total, m):
        if step == 5:
            raise Stop
    with pytest.raises(Stop):
        prune(tiny_cfg(model, text_file, tmp_path / "cut", **kw), Hooks(on_step=on_step))
    assert (tmp_path / ".cut.partial" / "checkpoints").is_dir()
    prune(PruneConfig.from_file(str(tmp_path / ".cut.partial" / "loraprune_config.json")),
          resume=str(tmp_path / "cut"))
    a = load_file(str(tmp_path / "straight" / "element_masks.safetensors"))
    b = load_file(str(tmp_path / "cut" / "element_masks.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    lb = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(la[k], lb[k], atol=1e-6) for k in la)


def test_bench_sparse_rows_table_and_speed(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "b"
    r = cli("bench", "--model", tiny_model_dir(), "--data", text_file, "--eval", text_file, "--eval-ctx", 32,
            "--eval-windows", 2, "--seq-len", 32, "--batch-size", 2, "--steps", 2, "--prune-every", 1,
            "--threads", 1, "--save-every", 0, "--out", out, "--no-plain", "--patterns", "2:4",
            "--element-criteria", "wanda", "--no-recovery", "--speed")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert [x["id"] for x in doc["rows"]] == ["wanda-oneshot-2of4", "wanda-oneshot-2of4-norec"]
    for row in doc["rows"]:
        assert row["pattern"] == "2:4" and row["speed"]["decode_tok_s_median"] > 0
        assert row["nonzero_params"] < row["params_pruned"]
    assert doc["rows"][1]["recovery_steps"] == 0 and doc["rows"][1]["steps"] == 0
    md = (out / "results.md").read_text()
    assert "| pattern |" in md and "2:4, no recovery" in md and "CPU prefill / decode" in md
    assert not (out / "runs" / "wanda-oneshot-2of4" / "model.safetensors").exists()  # exports dropped after speed
