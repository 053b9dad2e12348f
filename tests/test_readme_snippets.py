"""The README's "Using the pruned model" snippets, exactly as written, in a fresh process with stdin
closed: no trust_remote_code prompt, no "model of type X to instantiate a model of type Y" warning,
and the tokenizer needs no remote code in either order."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from loraprune.core.arch import model_spec
from loraprune.export.compact import export_compact
from test_export import random_masks

README = Path(__file__).resolve().parents[1] / "README.md"
BAD = ("Do you wish to run the custom code", "to instantiate a model of type", "trust_remote_code=True`")


def snippets() -> list[str]:
    section = README.read_text().split("## Using the pruned model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return [b for b in blocks if "from_pretrained(\"DIR\"" in b]


def run_fresh(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(cwd / "hf_modules")}
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)


def export(tmp_path, tokenizer, ratios, uniform=False) -> Path:
    model = tiny_model("llama", heads=8, kv=4, vocab=len(tokenizer))
    out = tmp_path / ("stock" if uniform else "hetero")
    info = export_compact(model, random_masks(model_spec(model.config), ratios), out, tokenizer=tokenizer,
                          uniform=uniform)
    assert info["kind"] == ("stock" if uniform else "heterogeneous")
    return out


def test_readme_has_both_snippets():
    blocks = snippets()
    assert len(blocks) == 2 and "trust_remote_code=True" in blocks[0] and "AutoTokenizer" in blocks[0]


@pytest.mark.parametrize("which", ["heterogeneous", "stock"])
def test_snippet_runs_without_prompt_or_warning(which, tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    out = export(tmp_path, tiny_tokenizer, [0.5, 0.5] if which == "stock" else [0.5, 0.25], uniform=which == "stock")
    code = snippets()[0 if which == "heterogeneous" else 1].replace('"DIR"', repr(str(out)))
    res = run_fresh(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for text in BAD:
        assert text not in res.stdout + res.stderr, (text, res.stderr[-2000:])
    if which == "heterogeneous":
        assert res.stdout.strip().startswith("The state of the union is")


def test_tokenizer_first_needs_no_remote_code(tmp_path, tiny_tokenizer):
    out = export(tmp_path, tiny_tokenizer, [0.5, 0.25])
    code = f"""
from transformers import AutoTokenizer
from transformers import AutoModelForCausalLM
tok = AutoTokenizer.from_pretrained({str(out)!r})
try:  # without trust_remote_code the stock class must refuse the pruned weights, not load them wrongly
    AutoModelForCausalLM.from_pretrained({str(out)!r})
    print("LOADED WITHOUT REMOTE CODE")
except Exception as err:
    print("refused:", type(err).__name__)
print(tok("The state of the union")["input_ids"])
"""
    res = run_fresh(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not any(text in res.stdout + res.stderr for text in BAD[:2]), res.stderr[-2000:]
    assert "refused: RuntimeError" in res.stdout and "LOADED" not in res.stdout
    assert res.stdout.strip().splitlines()[-1] == str(tiny_tokenizer("The state of the union")["input_ids"])
    assert not (tmp_path / "hf_modules").exists() or not list((tmp_path / "hf_modules").rglob("*.py"))
