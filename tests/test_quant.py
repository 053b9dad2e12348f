"""A quantized frozen base (--base-quant int8 / nf4, core/quant.py): bitsandbytes layers under peft's
LoRA, criteria on the dequantized weights, the export merges LoRA into them in float and equals the
quantized model it came from, --save-quant re-quantizes, and what cannot work is refused."""
import json

import pytest
import torch

from loraprune.core.arch import TARGET_MODULES, layer_modules, model_spec
from loraprune.core.criteria import build_criterion
from loraprune.core.lora import base_linear, base_weight
from loraprune.core.masks import MaskSet
from loraprune.errors import UserError
from loraprune.models import load_model
from test_cli_prune import cli, tiny_args

bnb = pytest.importorskip("bitsandbytes")
QUANTS = ["int8", "nf4"]
LAYER_CLASS = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


def with_lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def reference_dequant(linear) -> torch.Tensor:
    """The formulas, written out: int8 W = CB * SCB / 127 per row; nf4 through dequantize_4bit."""
    w = linear.weight
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = w.SCB if w.SCB is not None else linear.state.SCB
    return w.data.float() * scb.float()[:, None] / 127.0


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_load_and_dequantized_weight_is_what_the_layer_computes(quant, tiny_model_dir):
    model = load_model(str(tiny_model_dir()), "fp32", quant=quant)
    mods = layer_modules(model, 1)
    assert all(type(m).__name__ == LAYER_CLASS[quant] for m in mods.values())
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for name in ("q_proj", "down_proj"):
        lin = mods[name]
        lin.train()  # int8 on CPU: train mode is the exact dequantized fp32 matmul (eval also rounds x)
        with torch.no_grad():
            y = lin(x if name == "q_proj" else torch.randn(3, lin.in_features))
            w = base_weight(lin)
        assert torch.allclose(w, reference_dequant(lin), rtol=1e-6, atol=1e-8)  # (1/127 vs /127: ulps)
        if name == "q_proj":
            assert torch.allclose(y, x @ w.T, atol=1e-5), (y - x @ w.T).abs().max()
    full = load_model(str(tiny_model_dir()), "fp32")
    err = (base_weight(mods["q_proj"]) - layer_modules(full, 1)["q_proj"].weight).abs().max()
    assert 0 < err < (0.02 if quant == "int8" else 0.2)   # quantized, and close to the float weight


@pytest.mark.parametrize("quant", QUANTS)
def test_criteria_read_the_dequantized_merged_weight(quant, tiny_model_dir):
    model = with_lora(load_model(str(tiny_model_dir()), "fp32", quant=quant))
    spec = model_spec(model.config)
    got = build_criterion("magnitude").layer_scores(model, spec.layers[0])
    mods = layer_modules(model, 0)
    s = spec.layers[0]
    for c in (0, 17):   # one FFN channel: its gate and up rows and its down column, W' = W_dq + s B A
        want = 0.0
        for name, side in (("gate_proj", "row"), ("up_proj", "row"), ("down_proj", "col")):
            m = mods[name]
            w = (reference_dequant(base_linear(m)) + m.get_delta_weight("default").float()).detach()
            want += float((w[c] if side == "row" else w[:, c]).pow(2).sum())
        assert got["ffn"][c].item() == pytest.approx(want, rel=1e-5)
    masks = MaskSet(spec)
    masks.attach(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    lora = build_criterion("lora").layer_scores(model, s)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for k, v in lora.items() if k != "kv")
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("quant", QUANTS)
def test_prune_on_a_quantized_base_exports_the_model_it_trained(quant, tiny_model_dir, text_file, tmp_path):
    from peft import PeftModel

    model_dir = tiny_model_dir()
    out = tmp_path / "run"
    r = cli(*tiny_args(model_dir, text_file, out, "--ratio", 0.5, "--skip-layers", "none", "--base-quant", quant,
                       "--criterion", "lora", "--distill-alpha", 0.5))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["base_quant"] == quant and rep["params_pruned"] == rep["export"]["params"]
    assert rep["params_dense"] == sum(p.numel() for p in load_model(str(model_dir)).parameters())
    exported = load_model(str(out), "fp32")
    assert all(type(m).__name__ == "Linear" for m in layer_modules(exported, 0).values())   # float export
    # the same quantized base + the run's adapter + its masks, in train mode (dropout 0)
    ref = PeftModel.from_pretrained(load_model(str(model_dir), "fp32", quant=quant), str(out / "adapter"))
    MaskSet.load(out / "masks.json", model_spec(ref.config)).attach(ref)
    ref.train()
    ids = torch.randint(0, exported.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = exported(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_save_quant_writes_a_quantized_checkpoint_that_reloads(tiny_model_dir, text_file, tmp_path):
    # head_dim 64 and --round-to 64: every kept width fits bitsandbytes' 64-weight blocks (see next test)
    model_dir = tiny_model_dir(heads=2, kv=1, hidden=128, inter=128)
    outs = {}
    for q in ("none", "nf4"):
        outs[q] = tmp_path / q
        r = cli(*tiny_args(model_dir, text_file, outs[q], "--ratio", 0.5, "--skip-layers", "0", "--round-to", 64,
                           "--base-quant", "int8", "--save-quant", q))   # heterogeneous: our classes
        assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((outs["nf4"] / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes" and cfg["layer_intermediate_size"] == [128, 64]
    q = load_model(str(outs["nf4"]), "fp32")
    assert type(layer_modules(q, 0)["up_proj"]).__name__ == "Linear4bit"
    # the same weights as the float export (the two runs differ only in --save-quant), quantized the same way
    f = load_model(str(outs["none"]), "fp32")
    fq = load_model(str(outs["none"]), "fp32", quant="nf4")
    ids = torch.randint(0, f.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b, c = q(input_ids=ids).logits, fq(input_ids=ids).logits, f(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0) and not torch.allclose(a, c, atol=1e-3)
    size = {k: (v / "model.safetensors").stat().st_size for k, v in outs.items()}
    rep = json.loads((outs["nf4"] / "report.json").read_text())
    assert size["nf4"] < size["none"] and rep["export"]["quant"] == "nf4"


def test_nf4_layers_use_the_kernel_every_cpu_runs(tiny_model_dir, tmp_path):
    """On an AVX512-BF16 CPU bitsandbytes repacks a 4-bit layer on its first eval-mode no-grad forward,
    which fails for an input width that is not a multiple of 64 (the tiny down_proj takes 96) and rounds
    the block scales to bf16. Models we load keep the portable kernel, so this forward works and gives
    the same numbers on every CPU; an export that a stock loader could not run is refused."""
    from loraprune.core.quant import nf4_unfit_layers
    from loraprune.export.compact import _requantize

    d = tiny_model_dir()
    model = load_model(str(d), "fp32", quant="nf4")
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    down = layer_modules(model, 0)["down_proj"]
    assert down.in_features == 96
    model.eval()
    x = torch.randn(1, 5, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = down(x)
        ref = x @ bnb.functional.dequantize_4bit(down.weight.data, down.weight.quant_state).float().T
    assert torch.allclose(y, ref, atol=1e-4), (y - ref).abs().max()
    assert "model.layers.0.mlp.down_proj" in nf4_unfit_layers(model)
    with pytest.raises(UserError, match="--round-to 64"):
        _requantize(d, "nf4")
    assert not (d / ".quantized").exists()


@pytest.mark.parametrize("extra, msg", [
    (("--base-quant", "int8", "--criterion", "taylor"), "gradients of the base weights"),
    (("--save-quant", "nf4", "--ratio", 0.5), "--round-to 64"),
    (("--base-quant", "nf4", "--pattern", "2:4"), "needs --base-quant none"),
    (("--save-quant", "int8", "--no-export"), "needs the export"),
    (("--base-quant", "fp8"), "unknown --base-quant"),
])
def test_unsupported_combinations_are_one_line_errors(extra, msg, tiny_model_dir, text_file, tmp_path):
    r = cli(*tiny_args(tiny_model_dir(), text_file, tmp_path / "out", *extra))
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_bench_memory_quantized_cases_run(tmp_path):
    """bench-memory's int8 / nf4 cases: a random checkpoint saved once, loaded quantized per case."""
    import subprocess
    import sys

    from test_cli_prune import ENV

    r = subprocess.run([sys.executable, "-m", "loraprune", "bench-memory", "--shape", "tiny", "--modes",
                        "inference,lora,taylor", "--dtypes", "fp32,int8,nf4", "--checkpointing", "on", "--malloc",
                        "default", "--repeats", "1", "--threads", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                        "--out", str(tmp_path / "m")], capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "m" / "memory.json").read_text())["summary"]
    got = {(x["dtype"], x["mode"]) for x in rows if not x["errors"]}
    assert got == {("fp32", "inference"), ("fp32", "lora"), ("fp32", "taylor"), ("int8", "inference"),
                   ("int8", "lora"), ("nf4", "inference"), ("nf4", "lora")}   # no taylor on a quantized base
    lora_q = next(x for x in rows if x["dtype"] == "nf4" and x["mode"] == "lora")
    assert lora_q["vs_taylor"] > 0 and lora_q["vs_inference"] > 0
