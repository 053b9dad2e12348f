"""Mask semantics: masked units contribute nothing, GQA rule, exact final ratio, serialisation."""
import pytest
import torch

from conftest import tiny_model
from loraprune.core.arch import LayerSpec, ModelSpec, layer_modules, model_spec, parse_layers
from loraprune.errors import UserError
from loraprune.core.masks import MaskSet, ffn_keep, final_head_shapes, n_removed
from loraprune.core.pruning import UnitPruning, UnitTarget
from loraprune.core.schedule import Ramp


def ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_masked_units_contribute_nothing(family):
    model = tiny_model(family)
    spec = model_spec(model.config)
    masks = MaskSet(spec)
    m = masks.layers[1]
    m.heads[[2, 3]] = False  # KV group 1 loses both its query heads ...
    m.kv[1] = False          # ... so the KV head goes too
    m.heads[6] = False
    m.ffn[[0, 7, 50]] = False
    masks.sync_gates(1)
    masks.attach(model)
    x = ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
        mods = layer_modules(model, 1)
        d = spec.layers[1].head_dim
        for h in (2, 3, 6):
            mods["q_proj"].weight[h * d:(h + 1) * d] += 5.0
            mods["o_proj"].weight[:, h * d:(h + 1) * d] += 5.0
        for n in ("k_proj", "v_proj"):
            mods[n].weight[d:2 * d] += 5.0
            if mods[n].bias is not None:
                mods[n].bias[d:2 * d] += 5.0
        for c in (0, 7, 50):
            mods["gate_proj"].weight[c] += 5.0
            mods["up_proj"].weight[c] += 5.0
            mods["down_proj"].weight[:, c] += 5.0
        after = model(input_ids=x).logits
        assert torch.equal(before, after)
        mods["o_proj"].weight[:, 0] += 1.0  # a kept head's column does matter
        assert not torch.allclose(before, model(input_ids=x).logits)
    masks.detach()
    with torch.no_grad():
        assert not torch.allclose(before, model(input_ids=x).logits)


def test_round_half_up_and_ffn_rounding():
    assert n_removed(0.5, 9) == 5 and n_removed(0.2, 1536) == 307
    assert ffn_keep(0.2, 1536) == 1229
    assert ffn_keep(0.2, 1536, round_to=8) == 1232 and ffn_keep(0.2, 1536, 8) % 8 == 0
    assert ffn_keep(0.0, 1530, round_to=8) == 1530  # unpruned layers stay whole


def test_gqa_final_shapes_for_smollm2():
    s = LayerSpec(0, 9, 3, 64, 1536)
    # 20% of 9 heads: remove 2 -> 7 is not a product a*b (a<=3 KV heads, b<=3 per KV head): nearest is 6
    assert sorted(final_head_shapes(s, 0.2)) == [(2, 3), (3, 2)]
    assert final_head_shapes(s, 0.5) == [(2, 2)]   # remove 5 -> keep 4
    assert final_head_shapes(LayerSpec(0, 8, 8, 8, 16), 0.5) == [(4, 1)]  # MHA: exact


def _spec(layers=4, heads=9, kv=3, inter=40):
    return ModelSpec("llama", 64, tuple(LayerSpec(i, heads, kv, 8, inter) for i in range(layers)))


class RandomScores:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def layer_scores(self, model, spec):
        return {"heads": torch.rand(spec.num_heads, generator=self.g), "kv": torch.rand(spec.num_kv_heads, generator=self.g),
                "ffn": torch.rand(spec.intermediate_size, generator=self.g)}


@pytest.mark.parametrize("ratio,heads,kv,steps", [(0.2, 9, 3, 30), (0.5, 9, 3, 17), (0.6, 12, 2, 40),
                                                   (0.37, 8, 8, 25), (0.5, 12, 4, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_final_ratio_is_reached_exactly_and_masks_only_shrink(ratio, heads, kv, steps, seed):
    spec = _spec(heads=heads, kv=kv)
    masks = MaskSet(spec, prunable=[1, 2])
    pr = UnitPruning(masks, RandomScores(seed), Ramp(steps, prune_every=2, warmup_frac=0.1, cooldown_frac=0.2),
                     UnitTarget(ratio, ("heads", "ffn")))
    prev = [masks.layers[i].ffn.clone() for i in range(4)], [masks.layers[i].heads.clone() for i in range(4)]
    for step in range(1, steps + 1):
        pr.observe(None)
        pr.maybe_update(None, step)
        for i in range(4):
            assert not (masks.layers[i].ffn & ~prev[0][i]).any(), "a pruned channel came back"
            assert not (masks.layers[i].heads & ~prev[1][i]).any(), "a pruned head came back"
            prev[0][i], prev[1][i] = masks.layers[i].ffn.clone(), masks.layers[i].heads.clone()
    pr.finalize(None, steps)
    a, b = final_head_shapes(spec.layers[1], ratio)[0]
    for i in range(4):
        got = masks.kept_counts(i)
        if i in (1, 2):
            assert got["ffn"] == 40 - n_removed(ratio, 40)
            assert got["heads"] == a * b
            # GQA rule: every kept KV head keeps the same number of query heads; dropped KV heads keep none
            per = masks.layers[i].heads.view(kv, heads // kv).sum(1)
            assert set(per[masks.layers[i].kv].tolist()) == {got["heads"] // got["kv_heads"]}
            assert (per[~masks.layers[i].kv] == 0).all()
        else:
            assert got == {"heads": heads, "kv_heads": kv, "ffn": 40}


def test_mask_choice_follows_scores():
    spec = _spec(layers=1, heads=6, kv=3, inter=10)
    masks = MaskSet(spec)
    scores = {"heads": torch.tensor([1., 9., 2., 3., 8., 7.]), "kv": torch.tensor([0., 0., 0.]),
              "ffn": torch.arange(10.)}
    masks.update_layer(0, 0.5, 0.5, scores, ["heads", "ffn"])
    # keep 3 heads -> (3 groups x 1) or (1 group x 3 -- impossible, n_rep 2): best per group: 9, 3, 8
    assert masks.layers[0].heads.tolist() == [False, True, False, True, True, False]
    assert masks.layers[0].ffn.tolist() == [False] * 5 + [True] * 5


def test_masks_roundtrip(tmp_path):
    spec = _spec()
    masks = MaskSet(spec, prunable=[1, 2])
    masks.update_layer(1, 0.5, 0.5, RandomScores(0).layer_scores(None, spec.layers[1]), ["heads", "ffn"])
    masks.save(tmp_path / "m.json")
    back = MaskSet.load(tmp_path / "m.json", spec)
    for a, b in zip(masks.layers, back.layers):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.kv, b.kv) and torch.equal(a.ffn, b.ffn)
    assert back.prunable == [1, 2]
    assert torch.equal(back.ffn_gates[1], masks.layers[1].ffn.float())
    with pytest.raises(UserError):
        MaskSet.load(tmp_path / "m.json", _spec(layers=3))


def test_parse_layers():
    assert parse_layers("auto", 30) == [0, 1, 2, 29]
    assert parse_layers("auto", 2) == [1]
    assert parse_layers("none", 30) == []
    assert parse_layers("0-2,-1", 30) == [0, 1, 2, 29]
    for bad in ("x", "0-40", "31"):
        with pytest.raises(UserError):
            parse_layers(bad, 30)


def test_unknown_architecture_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(UserError, match="supports LLaMA-family"):
        model_spec(GPT2Config(n_layer=1))
