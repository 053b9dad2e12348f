"""Global allocation across layers (core/allocation.py): the same number of heads and channels as
uniform allocation, taken where the layer-relative scores are lowest, floors and GQA shapes kept,
masks only shrinking over a ramp, and the result reaching the report and the heterogeneous export."""
import json

import pytest
import torch

from loraprune.core.allocation import ffn_counts, head_counts
from loraprune.core.arch import LayerSpec, ModelSpec
from loraprune.core.masks import MaskSet, final_head_shapes, head_shapes
from loraprune.core.pruning import UnitPruning, UnitTarget
from loraprune.core.schedule import Ramp
from test_cli_prune import cli, tiny_args


def spec(layers=4, heads=9, kv=3, inter=40):
    return ModelSpec("llama", 64, tuple(LayerSpec(i, heads, kv, 8, inter) for i in range(layers)))


def random_scores(s: ModelSpec, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in s.layers:
        k = 1.0 if scale is None else scale[layer.index]
        out[layer.index] = {"heads": k * torch.rand(layer.num_heads, generator=g),
                            "kv": torch.zeros(layer.num_kv_heads),
                            "ffn": k * torch.rand(layer.intermediate_size, generator=g)}
    return out


def uniform_removed(s: ModelSpec, ratio: float):
    masks = MaskSet(s)
    for i in range(s.num_layers):
        masks.update_layer(i, ratio, ratio, random_scores(s)[i], ["heads", "ffn"])
    return sum(l.num_heads - masks.kept_counts(i)["heads"] for i, l in enumerate(s.layers)), \
        sum(l.intermediate_size - masks.kept_counts(i)["ffn"] for i, l in enumerate(s.layers))


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_same_budget_as_uniform_and_feasible_shapes(ratio):
    s = spec()
    masks = MaskSet(s)
    scores = random_scores(s, scale=[1, 10, 100, 1000])   # raw scales far apart: relative scores decide
    ffn, heads = ffn_counts(masks, scores, ratio, 0.1), head_counts(masks, scores, ratio, 0.1)
    h_uni, f_uni = uniform_removed(s, ratio)
    assert sum(40 - c for c in ffn.values()) == f_uni                    # channels: exactly the budget
    removed = sum(9 - c for c in heads.values())
    assert h_uni - 2 <= removed <= h_uni                                 # heads: up to one step short
    feasible = {a * b for a, b in head_shapes(s.layers[0])}
    assert all(c in feasible for c in heads.values())
    for i in range(s.num_layers):
        masks.keep_layer(i, scores[i], heads=heads[i], ffn=ffn[i])
        a, b = masks.layers[i].head_shape(s.layers[i])
        assert a * b == heads[i] and masks.kept_counts(i)["ffn"] == ffn[i]


def test_units_go_where_the_relative_scores_are_lowest():
    s = spec(layers=2, inter=40)
    masks = MaskSet(s)
    flat = torch.ones(40)                                          # layer 0: every channel average
    split = torch.cat([torch.full((20,), 0.01), torch.full((20,), 1.99)])  # layer 1: half nearly useless
    scores = {0: {"heads": torch.ones(9), "kv": torch.zeros(3), "ffn": 1000 * flat},
              1: {"heads": torch.ones(9), "kv": torch.zeros(3), "ffn": split}}
    ffn = ffn_counts(masks, scores, 0.25, 0.1)                     # budget: 10 + 10 channels
    assert ffn == {0: 40, 1: 20}
    masks.keep_layer(1, scores[1], ffn=ffn[1])
    assert torch.equal(masks.layers[1].ffn, split > 1)             # exactly the useless half went


def test_floor_is_kept():
    s = spec(layers=2, inter=40)
    masks = MaskSet(s)
    scores = {0: {"heads": torch.rand(9), "kv": torch.zeros(3), "ffn": torch.cat([torch.zeros(30), torch.ones(10)])},
              1: {"heads": torch.rand(9), "kv": torch.zeros(3), "ffn": torch.ones(40)}}
    ffn = ffn_counts(masks, scores, 0.5, min_keep=0.25)            # layer 0 would lose 30; it may lose 30 only
    assert ffn[0] == 10 and ffn[0] + ffn[1] == 40
    ffn = ffn_counts(masks, scores, 0.5, min_keep=0.5)
    assert ffn == {0: 20, 1: 20}
    heads = head_counts(masks, scores, 0.7, min_keep=0.5)          # at least 5 of 9 heads: 6 (2x3 or 3x2)
    assert all(c >= 5 for c in heads.values())


def test_over_a_ramp_masks_only_shrink_and_end_at_the_budget():
    s = spec(layers=4)
    masks = MaskSet(s, prunable=[1, 2, 3])
    pr = UnitPruning(masks, _Noisy(), Ramp(20, prune_every=2), UnitTarget(0.5, allocation="global", min_keep=0.1))
    prev = [m.ffn.clone() for m in masks.layers], [m.heads.clone() for m in masks.layers]
    for step in range(1, 21):
        pr.observe(None)
        pr.maybe_update(None, step)
        for i, m in enumerate(masks.layers):
            assert not (m.ffn & ~prev[0][i]).any() and not (m.heads & ~prev[1][i]).any()
            prev[0][i], prev[1][i] = m.ffn.clone(), m.heads.clone()
    pr.finalize(None, 20)
    kept = [masks.kept_counts(i) for i in range(4)]
    assert kept[0] == {"heads": 9, "kv_heads": 3, "ffn": 40}              # not prunable: untouched
    assert sum(40 - k["ffn"] for k in kept[1:]) == 3 * 20                 # 0.5 of 3 x 40 channels
    a, b = final_head_shapes(s.layers[1], 0.5)[0]
    assert 3 * (9 - a * b) - 2 <= sum(9 - k["heads"] for k in kept[1:]) <= 3 * (9 - a * b)


class _Noisy:
    """Fresh random scores each call, on a different scale per layer."""
    name = "noisy"

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def layer_scores(self, model, layer):
        k = 10.0 ** layer.index
        return {"heads": k * torch.rand(layer.num_heads, generator=self.g), "kv": torch.zeros(layer.num_kv_heads),
                "ffn": k * torch.rand(layer.intermediate_size, generator=self.g)}


def test_cli_global_allocation_exports_per_layer_widths(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    r = cli(*tiny_args(tiny_model_dir(layers=4), text_file, out, "--ratio", 0.5, "--skip-layers", "none",
                       "--allocation", "global", "--min-keep", 0.25))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["allocation"] == {"kind": "global", "min_keep": 0.25}
    ffn = [l["ffn"] for l in rep["layers"]]
    assert sum(96 - f for f in ffn) == 4 * 48 and all(f >= 24 for f in ffn)   # the uniform budget, floors kept
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_intermediate_size"] == ffn
    assert rep["params_pruned"] == rep["export"]["params"]
