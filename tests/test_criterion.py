"""The LoRA-guided criterion against a slow explicit reference, and its memory promise
(no gradient of a frozen weight is ever created)."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_model
from loraprune.core.arch import TARGET_MODULES, layer_modules, model_spec
from loraprune.core.criteria.gradient import LoraCriterion, lora_element_importance
from loraprune.core.lora import lora_parts
from loraprune.core.units import unit_sums
from loraprune.core.masks import MaskSet


def lora_model(family="llama", seed=0, **kw):
    model = tiny_model(family, seed=seed, **kw)
    torch.manual_seed(seed + 1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, lora_dropout=0.0))
    # B starts at zero; give it values so every term of the estimate matters
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return peft


def backward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def reference_importance(mod, mode):
    """Slow and explicit: take the actual step A <- A - G_A, B <- B - G_B and read off how much the
    merged weight moved; then loop over elements."""
    _p = lora_parts(mod)
    W, A, B, s = _p.weight, _p.A, _p.B, _p.scaling
    W, A, B = W.detach().double(), A.detach().double(), B.detach().double()
    gA, gB = _p.A.grad.double(), _p.B.grad.double()
    merged = W + s * B @ A
    moved = W + s * (B - gB) @ (A - gA)
    g_hat = merged - moved
    out = torch.zeros_like(W)
    for o in range(W.shape[0]):
        for i in range(W.shape[1]):
            v = merged[o, i] * g_hat[o, i]
            out[o, i] = v * v if mode == "squared" else abs(v)
    if mode == "abs-norm":
        out = out / torch.sqrt((out * out).sum())
    return out


@pytest.mark.parametrize("mode", ["squared", "abs-norm"])
def test_element_importance_matches_slow_reference(mode):
    model = lora_model(heads=4, kv=2, hidden=16, inter=24)
    backward(model)
    for name, mod in layer_modules(model, 1).items():
        got = lora_element_importance(mod, mode).double()
        ref = reference_importance(mod, mode)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-12 + 1e-5 * float(ref.abs().max())), name
        assert float(got.abs().sum()) > 0, name


def test_unit_sums_cover_exactly_the_owned_rows_and_columns():
    model = lora_model()  # 8 heads, 4 KV heads, head_dim 8, FFN 96
    spec = model_spec(model.config).layers[0]
    mods = layer_modules(model, 0)
    elem = {n: torch.rand(m.base_layer.weight.shape, dtype=torch.float64) for n, m in mods.items()}
    got = unit_sums(spec, elem)
    d = spec.head_dim
    for h in range(spec.num_heads):
        want = sum(float(elem["q_proj"][r].sum()) for r in range(h * d, (h + 1) * d))
        want += sum(float(elem["o_proj"][:, c].sum()) for c in range(h * d, (h + 1) * d))
        assert got["heads"][h].item() == pytest.approx(want, rel=1e-12)
    for g in range(spec.num_kv_heads):
        want = sum(float(elem[n][r].sum()) for n in ("k_proj", "v_proj") for r in range(g * d, (g + 1) * d))
        assert got["kv"][g].item() == pytest.approx(want, rel=1e-12)
    for c in range(spec.intermediate_size):
        want = float(elem["gate_proj"][c].sum() + elem["up_proj"][c].sum() + elem["down_proj"][:, c].sum())
        assert got["ffn"][c].item() == pytest.approx(want, rel=1e-12)


def test_criterion_scores_every_kept_unit():
    model = lora_model()
    spec = model_spec(model.config)
    masks = MaskSet(spec)
    masks.layers[0].heads[3] = False
    masks.layers[0].ffn[5] = False
    masks.sync_gates(0)
    masks.attach(model)
    backward(model)
    scores = LoraCriterion("squared").layer_scores(model, spec.layers[0])
    assert scores["heads"].shape == (8,) and scores["kv"].shape == (4,) and scores["ffn"].shape == (96,)
    # (masked units may still get a nonzero *estimate* through G_B @ A on their o/down columns;
    # the mask update excludes them anyway, see test_masks)
    assert (scores["heads"][torch.arange(8) != 3] > 0).all()
    assert (scores["ffn"][torch.arange(96) != 5] > 0).all()


def test_frozen_base_weights_never_get_grad():
    from loraprune.core.pruning import UnitPruning, UnitTarget
    from loraprune.core.schedule import Ramp

    model = lora_model("qwen2")
    spec = model_spec(model.config)
    masks = MaskSet(spec)
    masks.attach(model)
    pruner = UnitPruning(masks, LoraCriterion(), Ramp(2, prune_every=1, warmup_frac=0.0, cooldown_frac=0.0),
                         UnitTarget(0.5, ("heads", "ffn")))
    for step in (1, 2):
        backward(model, seed=step)
        pruner.observe(model)
        pruner.maybe_update(model, step)
        model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and not p.requires_grad, n
    assert masks.kept_counts(0)["ffn"] == 48


def test_gradient_checkpointing_gives_the_same_scores():
    scores = []
    for ckpt in (False, True):
        model = lora_model()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        backward(model)
        scores.append(LoraCriterion().layer_scores(model, model_spec(model.config).layers[1]))
    for k in scores[0]:
        assert torch.allclose(scores[0][k], scores[1][k], rtol=1e-5, atol=0), k


def test_rows_projections_sum_only_where_units_own_rows():
    """--lora-projections rows: heads from q rows only, KV heads from k/v rows, channels from gate/up
    rows; o_proj and down_proj (whose units own columns) contribute nothing, whatever their values."""
    model = lora_model(heads=4, kv=2, hidden=16, inter=24)
    spec = model_spec(model.config).layers[1]
    backward(model)
    mods = layer_modules(model, 1)
    ref = {n: reference_importance(m, "squared") for n, m in mods.items()}
    got = LoraCriterion("squared", projections="rows").layer_scores(model, spec)
    full = LoraCriterion("squared").layer_scores(model, spec)
    d = spec.head_dim
    for h in range(spec.num_heads):
        want = float(ref["q_proj"][h * d:(h + 1) * d].sum())
        assert got["heads"][h].item() == pytest.approx(want, rel=1e-4)
        assert full["heads"][h].item() > got["heads"][h].item()  # o_proj columns add to the paper's sum
    for g in range(spec.num_kv_heads):
        want = float(ref["k_proj"][g * d:(g + 1) * d].sum() + ref["v_proj"][g * d:(g + 1) * d].sum())
        assert got["kv"][g].item() == pytest.approx(want, rel=1e-4)
    want = ref["gate_proj"].sum(1) + ref["up_proj"].sum(1)
    assert torch.allclose(got["ffn"].double(), want, rtol=1e-4)
    assert (full["ffn"] > got["ffn"]).all()
    with pytest.raises(ValueError):
        LoraCriterion("squared", projections="columns")


def test_lora_projections_flag_reaches_the_run(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """--lora-projections is used by the criterion of a real run and saved with its config."""
    import json

    from loraprune.core.criteria import gradient as criteria
    from loraprune.core.config import PruneConfig
    from loraprune.run import prune

    seen = set()
    orig = criteria.LoraCriterion.layer_scores

    def spy(self, model, spec):
        seen.add(self.projections)
        return orig(self, model, spec)

    monkeypatch.setattr(criteria.LoraCriterion, "layer_scores", spy)
    model = str(tiny_model_dir())
    for which in ("rows", "all"):
        seen.clear()
        out = tmp_path / which
        cfg = PruneConfig(model=model, data=str(text_file), eval_windows=0, seq_len=32, batch_size=2, steps=4,
                          prune_every=1, ratio=0.5, skip_layers="none", export=False, save_every=0,
                          lora_projections=which, criterion="lora", out=str(out))
        prune(cfg)
        assert seen == {which}
        assert json.loads((out / "loraprune_config.json").read_text())["lora_projections"] == which
