"""Long runs: SIGKILL after a checkpoint + --resume == an uninterrupted run; SIGTERM checkpoints;
a killed run never leaves a directory that looks finished."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from test_cli_prune import ENV, cli, tiny_args

ARGS = ("--ratio", 0.5, "--steps", 12, "--save-every", 3, "--keep-checkpoints", 2, "--lora-dropout", 0.1,
        "--no-export", "--eval-windows", 1)


def _start(model, text, out, delay):
    cmd = [sys.executable, "-m", "loraprune", *map(str, tiny_args(model, text, out, *ARGS))]
    return subprocess.Popen(cmd, env={**ENV, "LORAPRUNE_FAULTS": f"delay={delay}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(part, step, proc, timeout=120):
    target = part / "checkpoints" / f"step-{step:07d}"
    t0 = time.time()
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def _same_run(a, b):
    assert json.loads((a / "masks.json").read_text()) == json.loads((b / "masks.json").read_text())
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-7), k
    ra, rb = (json.loads((x / "report.json").read_text()) for x in (a, b))
    assert ra["losses"] == rb["losses"]


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    ref = tmp_path / "ref"
    r = cli(*tiny_args(model, text_file, ref, *ARGS))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    part = tmp_path / ".run.partial"
    proc = _start(model, text_file, out, delay=0.4)
    ck = random.Random().choice([3, 6, 9])
    _wait_for_checkpoint(part, ck, proc)
    time.sleep(random.random() * 0.5)  # somewhere after the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a finished-looking output"
    assert not (part / "report.json").exists()
    kept = sorted(os.listdir(part / "checkpoints"))
    assert 1 <= len(kept) <= 2 and all(k.startswith("step-") for k in kept)
    r = cli("prune", "--resume", out, "--threads", 1)
    assert r.returncode == 0, r.stderr
    assert "resumed from step-" in r.stderr
    assert not part.exists() and not (out / "checkpoints").exists()
    _same_run(ref, out)


def test_sigterm_checkpoints_and_resumes(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    out = tmp_path / "run"
    part = tmp_path / ".run.partial"
    proc = _start(model, text_file, out, delay=0.3)
    _wait_for_checkpoint(part, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and not out.exists()
    r = cli("prune", "--resume", out, "--threads", 1)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    assert cli(*tiny_args(model, text_file, ref, *ARGS)).returncode == 0
    _same_run(ref, out)


def test_resume_errors(tiny_model_dir, text_file, tmp_path):
    r = cli("prune", "--resume", tmp_path / "nothing")
    assert r.returncode == 2 and "no unfinished run" in r.stderr
    (tmp_path / ".x.partial").mkdir()
    (tmp_path / ".x.partial" / "loraprune_config.json").write_text("{}")
    r = cli("prune", "--resume", tmp_path / "x", "--ratio", 0.3)
    assert r.returncode == 2 and "drop --ratio" in r.stderr
    # a fresh run refuses to clobber an unfinished one
    r = cli(*tiny_args(tiny_model_dir(), text_file, tmp_path / "x"))
    assert r.returncode == 2 and "--resume" in r.stderr


def test_resume_with_distillation_and_global_allocation_equals_uninterrupted(tiny_model_dir, text_file, tmp_path):
    """Bit-identical resume also with the teacher forward in every step and masks allocated across layers."""
    model = tiny_model_dir()
    extra = ("--distill-alpha", 0.5, "--distill-temp", 2, "--allocation", "global", "--skip-layers", "none")
    ref = tmp_path / "ref"
    assert cli(*tiny_args(model, text_file, ref, *ARGS, *extra)).returncode == 0
    out, part = tmp_path / "run", tmp_path / ".run.partial"
    cmd = [sys.executable, "-m", "loraprune", *map(str, tiny_args(model, text_file, out, *ARGS, *extra))]
    proc = subprocess.Popen(cmd, env={**ENV, "LORAPRUNE_FAULTS": "delay=0.4"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(part, 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = cli("prune", "--resume", out, "--threads", 1)
    assert r.returncode == 0, r.stderr
    _same_run(ref, out)
    rep = json.loads((out / "report.json").read_text())
    assert rep["allocation"]["kind"] == "global" and len(rep["loss_parts"]["kl"]) == 12
