"""Compact export: exported == masked unmerged model, reloadability (fresh process, stock config),
generate with/without cache, exact parameter count, peft round trip, ratio 0 == merged dense,
the export / bench-speed commands."""
import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE, tiny_model
from loraprune.core.arch import TARGET_MODULES, layer_modules, model_spec
from loraprune.errors import UserError
from loraprune.export.compact import build_compact_model, export_compact
from loraprune.export.merge import merged_state_dict
from loraprune.core.masks import MaskSet

ATOL = 1e-4  # fp32 logits of magnitude ~10: merge + slice only reorder sums (seen: ~1e-5)
SRC = Path(__file__).resolve().parents[1] / "src" / "loraprune" / "export"


def with_lora(model, seed=0, r=4):
    """Wrap in peft LoRA and perturb B (init is zero) so merging changes the weights."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGET_MODULES))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm.eval()


def random_masks(spec, ratios, seed=0, uniform_heads=False) -> MaskSet:
    """Masks chosen from random scores; layer i pruned at ratios[i] (heterogeneous when they differ)."""
    ms = MaskSet(spec, uniform_heads=uniform_heads)
    g = torch.Generator().manual_seed(seed)
    for i, (s, r) in enumerate(zip(spec.layers, ratios)):
        if r > 0:
            scores = {"heads": torch.rand(s.num_heads, generator=g), "kv": torch.rand(s.num_kv_heads, generator=g),
                      "ffn": torch.rand(s.intermediate_size, generator=g)}
            ms.update_layer(i, r, r, scores, ["heads", "ffn"])
    return ms


def ids(vocab, n=2, t=19, seed=3):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def load(path):
    from loraprune.models import load_model

    return load_model(str(path), "fp32")


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def assert_greedy(model, prompt, out, tol=1e-4):
    """Every generated token is the argmax of the full (uncached) forward, up to `tol`. Comparing the
    cached and uncached token sequences for equality instead would depend on the CPU's kernels: a
    near-tie in the logits can flip with the summation order. (The prompt holds no pad token, so
    generate() uses no attention mask either.) min_new_tokens forbids EOS, so EOS is left out of the max."""
    full = logits(model, out[:, :-1])[0]                       # [len - 1, vocab]
    eos = model.generation_config.eos_token_id
    full[:, [eos] if isinstance(eos, int) else list(eos or [])] = float("-inf")
    for t in range(prompt.shape[1] - 1, out.shape[1] - 1):
        chosen = full[t, out[0, t + 1]]
        assert chosen >= full[t].max() - tol, (t, float(full[t].max() - chosen))


CASES = {  # name: (family, heads, kv, per-layer ratios)
    "mha": ("llama", 8, 8, [0.3, 0.6]),
    "gqa": ("llama", 8, 4, [0.25, 0.5]),
    "qwen2-bias": ("qwen2", 8, 2, [0.5, 0.3]),
    "mistral": ("mistral", 8, 4, [0.0, 0.5]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_logits_equal_masked_unmerged(case, tmp_path):
    family, heads, kv, ratios = CASES[case]
    model = with_lora(tiny_model(family, heads=heads, kv=kv))
    spec = model_spec(model.config)
    masks = random_masks(spec, ratios)
    masks.attach(model)
    x = ids(model.config.vocab_size)
    ref = logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    info = export_compact(model, masks, tmp_path, uniform=False)

    # the caller's model is untouched: same weights, still unmerged and masked
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, x), ref)
    exported = load(tmp_path)
    assert torch.allclose(logits(exported, x), ref, atol=ATOL, rtol=0), (logits(exported, x) - ref).abs().max()
    # heterogeneous widths -> our config, with the modeling file next to the weights
    assert info["kind"] == "heterogeneous" and (tmp_path / "modeling_loraprune.py").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    # the source family's model_type (AutoTokenizer reads config.json: no remote code for a stock tokenizer)
    assert cfg["model_type"] == family and cfg["source_model_type"] == family
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_loraprune.LoraPrune")
    counts = [masks.kept_counts(i) for i in range(spec.num_layers)]
    assert cfg["layer_num_attention_heads"] == [c["heads"] for c in counts]
    assert cfg["layer_num_key_value_heads"] == [c["kv_heads"] for c in counts]
    assert cfg["layer_intermediate_size"] == [c["ffn"] for c in counts]
    # exact parameter count, as predicted (qwen2: q/k/v bias entries included)
    n = sum(p.numel() for p in exported.parameters())
    dense = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    assert info["params"] == n == dense - masks.params_removed()
    # the reloaded model has the pruned architecture
    assert model_spec(exported.config).qkv_bias == (family == "qwen2")
    for i, c in enumerate(counts):
        attn = exported.model.layers[i].self_attn
        assert attn.q_proj.out_features == c["heads"] * spec.layers[i].head_dim
        assert (attn.q_proj.bias is not None) == (family == "qwen2")
        assert exported.model.layers[i].mlp.down_proj.in_features == c["ffn"]


def test_fresh_process_loads_with_trust_remote_code_and_no_loraprune(tmp_path):
    model = with_lora(tiny_model("qwen2", heads=8, kv=4))
    masks = random_masks(model_spec(model.config), [0.5, 0.25])
    masks.attach(model)
    x = ids(model.config.vocab_size)
    torch.save({"x": x, "ref": logits(model, x)}, tmp_path / "io.pt")
    export_compact(model, masks, tmp_path / "out")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, trust_remote_code=True).eval()
d = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    err = (m(input_ids=d["x"]).logits - d["ref"]).abs().max().item()
assert not [k for k in sys.modules if k.split(".")[0] == "loraprune"], "loraprune was imported"
print(type(m).__module__, err)
"""
    out = _fresh_python(code, tmp_path)
    module, err = out.split()[-2:]
    assert module.startswith("transformers_modules.") and float(err) < ATOL


def _fresh_python(code: str, cwd: Path) -> str:
    # -I: isolated (no cwd / PYTHONPATH on sys.path, no user site); the venv's packages stay.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(cwd / "hf_modules")}
    res = subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()


def test_uniform_export_is_a_stock_config(tmp_path):
    model = with_lora(tiny_model("llama", heads=8, kv=4))
    spec = model_spec(model.config)
    masks = random_masks(spec, [0.5, 0.5], uniform_heads=True)  # 4 of 8 heads: 64 % 4 == 0
    masks.attach(model)
    x = ids(model.config.vocab_size)
    info = export_compact(model, masks, tmp_path, uniform=True)
    assert info["kind"] == "stock" and not info["needs_trust_remote_code"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert not (tmp_path / "modeling_loraprune.py").exists()
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, masks.kept_counts(0)["kv_heads"])
    # loads in a fresh process without trust_remote_code, as a plain LlamaForCausalLM
    torch.save({"x": x, "ref": logits(model, x)}, tmp_path / "io.pt")
    out = _fresh_python(f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
d = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    print(type(m).__name__, (m(input_ids=d["x"]).logits - d["ref"]).abs().max().item())
""", tmp_path)
    name, err = out.split()[-2:]
    assert name == "LlamaForCausalLM" and float(err) < ATOL


def test_uniform_export_refuses_what_stock_configs_cannot_hold(tmp_path):
    model = tiny_model("llama", heads=8, kv=4)
    spec = model_spec(model.config)
    with pytest.raises(UserError, match="different numbers"):
        export_compact(model, random_masks(spec, [0.25, 0.5]), tmp_path / "a", uniform=True)
    # 6 of 8 heads: hidden 64 is not a multiple of 6 -> LlamaConfig rejects it; heterogeneous is fine
    mha = tiny_model("llama", heads=8, kv=8)
    masks = random_masks(model_spec(mha.config), [0.25, 0.25])
    with pytest.raises(UserError, match="stock llama config rejects"):
        export_compact(mha, masks, tmp_path / "b", uniform=True)
    assert export_compact(mha, masks, tmp_path / "c")["kind"] == "heterogeneous"


def test_uniform_heads_makes_every_layer_take_the_same_gqa_shape():
    # 9 heads / 3 KV heads at ratio 0.2 keeps 6 heads: 2 groups x 3 or 3 groups x 2. Scores below make
    # layer 0 prefer dropping a group and layer 1 prefer dropping a head per group; --uniform must
    # not let them differ (a stock config has one num_key_value_heads).
    spec = model_spec(tiny_model("llama", heads=9, kv=3, hidden=72).config)
    weak_group = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0, 0])
    weak_head = torch.tensor([0.0, 1, 1, 0, 1, 1, 0, 1, 1])

    def shapes(uniform):
        ms = MaskSet(spec, uniform_heads=uniform)
        for i, heads in enumerate((weak_group, weak_head)):
            ms.update_layer(i, 0.2, 0.2, {"heads": heads, "kv": torch.zeros(3), "ffn": torch.rand(96)}, ["heads"])
        return [ms.layers[i].head_shape(s) for i, s in enumerate(spec.layers)]

    assert shapes(False) == [(2, 3), (3, 2)]
    assert shapes(True) == [(2, 3), (2, 3)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_same_greedy_tokens_with_and_without_cache(family, tmp_path):
    model = with_lora(tiny_model(family, heads=8, kv=4))
    masks = random_masks(model_spec(model.config), [0.5, 0.25])
    export_compact(model, masks, tmp_path)
    exported = load(tmp_path)
    prompt = 3 + ids(model.config.vocab_size - 3, n=1, t=7)  # no pad/bos/eos in the prompt: no attention mask
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = exported.generate(prompt, use_cache=True, **kw)
        uncached = exported.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == uncached.shape[1] == 19
    assert_greedy(exported, prompt, cached)
    assert_greedy(exported, prompt, uncached)


def test_peft_round_trip_and_reprune(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = with_lora(tiny_model("llama", heads=8, kv=4))
    masks = random_masks(model_spec(model.config), [0.25, 0.5])
    export_compact(model, masks, tmp_path)
    exported = load(tmp_path)
    pm = get_peft_model(exported, LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES))
    pm.train()
    x = ids(exported.config.vocab_size, t=16)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    loss0 = pm(input_ids=x, labels=x).loss
    loss0.backward()
    lora_grads = [p.grad for n, p in pm.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert all(p.grad is None for n, p in pm.named_parameters() if "lora_" not in n)
    opt.step()
    assert torch.isfinite(pm(input_ids=x, labels=x).loss)
    # the export can itself be pruned (per-layer widths read back) and exported again
    spec = model_spec(pm.get_base_model().config)
    assert [s.num_heads for s in spec.layers] == [masks.kept_counts(i)["heads"] for i in range(2)]
    again = random_masks(spec, [0.0, 0.5], seed=9)
    again.attach(pm)
    pm.eval()
    ref = logits(pm, x)
    export_compact(pm, again, tmp_path / "again")
    assert torch.allclose(logits(load(tmp_path / "again"), x), ref, atol=ATOL, rtol=0)


def test_ratio_zero_export_equals_merged_dense(tmp_path, tiny_tokenizer):
    model = with_lora(tiny_model("llama", heads=8, kv=4, vocab=len(tiny_tokenizer)))
    masks = MaskSet(model_spec(model.config))
    masks.attach(model)
    info = export_compact(model, masks, tmp_path, tokenizer=tiny_tokenizer)
    merged = copy.deepcopy(model).merge_and_unload()  # peft's own merge, on a copy
    exported = load(tmp_path)
    ref = merged.state_dict()
    got = exported.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert info["kind"] == "stock" and exported.config.model_type == "llama"
    assert info["params"] == sum(p.numel() for p in merged.parameters())
    # tokenizer and generation config travel with the model
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)(SAMPLE)["input_ids"] == tiny_tokenizer(SAMPLE)["input_ids"]
    assert (tmp_path / "generation_config.json").is_file()


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_save_dtype(dtype, torch_dtype, tmp_path):
    from safetensors import safe_open

    model = with_lora(tiny_model("llama", heads=8, kv=4))
    masks = random_masks(model_spec(model.config), [0.5, 0.25])
    masks.attach(model)
    info = export_compact(model, masks, tmp_path, save_dtype=dtype)
    assert info["dtype"] == dtype
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch_dtype}
    exported = load(tmp_path)  # upcast to fp32 for the comparison
    x = ids(model.config.vocab_size)
    assert torch.allclose(logits(exported, x), logits(model, x), atol=0.1, rtol=0.02)


def test_merged_state_dict_matches_peft_merge():
    model = with_lora(tiny_model("qwen2", heads=8, kv=4))
    ours = merged_state_dict(model)
    ref = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(ours) == set(ref) and all(torch.allclose(ours[k], ref[k], atol=1e-6) for k in ref)
    assert not any(ours[k].data_ptr() == v.data_ptr() for k, v in model.get_base_model().state_dict().items()
                   if k in ours)  # copies, never views of the source


def test_modeling_file_imports_only_torch_and_transformers():
    tree = ast.parse((SRC / "modeling_loraprune.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import: the file must stand alone next to the weights"
            roots.add(node.module.split(".")[0])
    # huggingface_hub provides @strict, which transformers' own configs use; it is a transformers dependency
    assert roots <= {"__future__", "torch", "transformers", "huggingface_hub"}, roots


def test_load_model_uses_the_installed_classes_without_remote_code(tmp_path):
    model = tiny_model("llama", heads=8, kv=4)
    export_compact(model, random_masks(model_spec(model.config), [0.5, 0.25]), tmp_path)
    exported = load(tmp_path)  # no trust_remote_code: loraprune's own class is used
    assert type(exported).__module__ == "loraprune.export.modeling_loraprune"


def test_legacy_loraprune_llama_export_still_loads(tmp_path):
    """Exports of loraprune < 0.2 said model_type loraprune_llama; load_model registers that type."""
    model = tiny_model("llama", heads=8, kv=4)
    masks = random_masks(model_spec(model.config), [0.5, 0.25])
    export_compact(model, masks, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "loraprune_llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    x = ids(model.config.vocab_size)
    masks.attach(model)
    exported = load(tmp_path)
    assert type(exported).__name__ == "LoraPruneLegacyForCausalLM"
    assert torch.allclose(logits(exported, x), logits(model, x), atol=ATOL, rtol=0)


def make_run_dir(tmp_path, tiny_model_dir, ratios=(0.25, 0.5)) -> Path:
    """A finished-run layout (loraprune_config.json, adapter/, masks.json) for a tiny saved model."""
    from loraprune.core.config import PruneConfig
    from loraprune.models import load_model

    model_dir = tiny_model_dir("llama")
    model = with_lora(load_model(str(model_dir)))
    masks = random_masks(model_spec(model.config), list(ratios))
    run = tmp_path / "run"
    run.mkdir()
    model.save_pretrained(run / "adapter")
    masks.save(run / "masks.json")
    PruneConfig(model=str(model_dir), skip_layers="none").save(run / "loraprune_config.json")
    return run


def test_export_command(tmp_path, tiny_model_dir):
    from loraprune.cli import main

    run = make_run_dir(tmp_path, tiny_model_dir)
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--save-dtype", "fp32"]) == 0
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["kind"] == "heterogeneous" and (tmp_path / "out" / "tokenizer.json").is_file()
    # same result as exporting the in-memory model
    from loraprune.models import load_model
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(json.loads((run / "loraprune_config.json").read_text())["model"]),
                                      run / "adapter").eval()
    masks = MaskSet.load(run / "masks.json", model_spec(model.config))
    masks.attach(model)
    x = ids(model.config.vocab_size)
    assert torch.allclose(logits(load(tmp_path / "out"), x), logits(model, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["no_run", "no_masks", "bad_masks", "uniform", "out_not_empty"])
def test_export_command_bad_input(case, tmp_path, tiny_model_dir, capsys):
    from loraprune.cli import main

    run = make_run_dir(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    args = ["export", str(run), "--out", str(out)]
    if case == "no_run":
        args[1] = str(tmp_path / "missing")
    elif case == "no_masks":
        (run / "masks.json").unlink()
    elif case == "bad_masks":
        (run / "masks.json").write_text('{"format": "loraprune-masks", "layers": []}')
    elif case == "uniform":
        args.append("--uniform")
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraprune: error:") and len(err.splitlines()) == 1
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left


def test_bench_speed_command(tmp_path, tiny_model_dir):
    from loraprune.cli import main
    from loraprune.models import load_model

    dense = tiny_model_dir("llama")
    model = load_model(str(dense))
    export_compact(model, random_masks(model_spec(model.config), [0.5, 0.5]), tmp_path / "pruned")
    out = tmp_path / "speed.json"
    assert main(["bench-speed", str(dense), str(tmp_path / "pruned"), "--ctx", "32", "--new-tokens", "3",
                 "--repeats", "2", "--warmup", "1", "--threads", "1", "--json", str(out),
                 "--md", str(tmp_path / "speed.md"), "--label", "dense", "--label", "pruned"]) == 0
    res = json.loads(out.read_text())
    dense_row, pruned_row = res["models"]
    assert len(dense_row["prefill_s"]) == 2 and len(pruned_row["decode_s"]) == 2
    assert pruned_row["params"] < dense_row["params"] and dense_row["speedup_prefill_paired_median"] == 1.0
    assert all(row["peak_mem_mb"] > 0 for row in res["models"])  # per-model probe processes
    assert res["setup"]["threads"] == 1 and "| pruned |" in (tmp_path / "speed.md").read_text()


@pytest.mark.real
def test_smollm2_export_matches_masked_model_fast(tmp_path):
    """The embedded SmolLM2 (GQA 9/3 heads): random heterogeneous masks, nonzero LoRA, 48 tokens."""
    from loraprune.models import load_model, load_tokenizer

    model = with_lora(load_model(None), r=2)
    spec = model_spec(model.config)
    ratios = [0.0, 0.2, 0.5] * (spec.num_layers // 3)
    masks = random_masks(spec, ratios)
    masks.attach(model)
    x = load_tokenizer(None)(SAMPLE, return_tensors="pt")["input_ids"][:, :48]
    ref = logits(model, x)
    info = export_compact(model, masks, tmp_path)
    assert info["params"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) \
        - masks.params_removed()
    err = (logits(load(tmp_path), x) - ref).abs().max().item()
    assert err < 1e-3, err


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_export_on_real_text_ctx512(tmp_path):
    """Real text, 512 tokens: exported logits == masked unmerged logits; bf16 export close; greedy
    generate identical with and without cache."""
    from loraprune import data
    from loraprune.models import load_model, load_tokenizer

    tok = load_tokenizer(None)
    model = with_lora(load_model(None), r=8)
    spec = model_spec(model.config)
    masks = random_masks(spec, [0.0] * 3 + [0.5] * (spec.num_layers - 4) + [0.0], seed=1)
    masks.attach(model)
    text = data.join_documents(data.load_documents("sotu-heldout", "test", "text"))
    x = tok(text[:20000], return_tensors="pt")["input_ids"][:, :512]
    ref = logits(model, x)
    export_compact(model, masks, tmp_path / "fp32", tokenizer=tok)
    exported = load(tmp_path / "fp32")
    assert (logits(exported, x) - ref).abs().max().item() < 1e-3
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with torch.no_grad():
        for cache in (True, False):
            assert_greedy(exported, x[:, :64], exported.generate(x[:, :64], use_cache=cache, **kw), tol=1e-3)
    export_compact(model, masks, tmp_path / "bf16", save_dtype="bf16")
    nll = torch.nn.functional.cross_entropy
    ref_loss = nll(ref[0, :-1], x[0, 1:])
    assert abs(nll(logits(load(tmp_path / "bf16"), x)[0, :-1], x[0, 1:]) - ref_loss) < 0.05 * ref_loss


@pytest.mark.parametrize("uniform", [False, True])
def test_prune_cli_writes_the_compact_model(uniform, tiny_model_dir, text_file, tmp_path):
    from loraprune.cli import main

    out = tmp_path / "run"
    extra = ["--uniform"] if uniform else ["--skip-layers", "0"]
    assert main(["prune", "--model", str(tiny_model_dir()), "--data", str(text_file), "--eval-windows", "0",
                 "--seq-len", "32", "--batch-size", "2", "--steps", "6", "--prune-every", "1", "--threads", "1",
                 "--ratio", "0.5", "--out", str(out), *extra]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["params_pruned"] == rep["params_pruned_predicted"] == rep["export"]["params"] < rep["params_dense"]
    assert rep["export"]["kind"] == ("stock" if uniform else "heterogeneous")
    exported = load(out)
    assert type(exported).__name__ == ("LlamaForCausalLM" if uniform else "LoraPruneLlamaForCausalLM")
    # the top-level model == the run's masked, unmerged LoRA model rebuilt from adapter/ and masks.json
    from peft import PeftModel

    from loraprune.models import load_model

    cfg = json.loads((out / "loraprune_config.json").read_text())
    model = PeftModel.from_pretrained(load_model(cfg["model"]), out / "adapter").eval()
    masks = MaskSet.load(out / "masks.json", model_spec(model.config))
    masks.attach(model)
    x = ids(model.config.vocab_size)
    assert torch.allclose(logits(exported, x), logits(model, x), atol=ATOL, rtol=0)
