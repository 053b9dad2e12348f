"""Data parallel through torchrun (gloo on CPU): 2 processes == 1 process with the same global batch."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from test_cli_prune import ENV, cli, tiny_args

TORCHRUN = Path(sys.executable).parent / "torchrun"
ARGS = ("--ratio", 0.5, "--steps", 8, "--batch-size", 4, "--skip-layers", "none", "--no-export", "--debug-sync",
        "--lora-dropout", 0.0)

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")


def torchrun(*args, env=None, **kw):
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
           "loraprune", *map(str, args)]
    return subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def _compare(a, b, atol=1e-6):
    assert json.loads((a / "masks.json").read_text()) == json.loads((b / "masks.json").read_text())
    wa = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=atol), (k, (wa[k] - wb[k]).abs().max())


def test_two_processes_match_one(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    one, two = tmp_path / "one", tmp_path / "two"
    r = cli(*tiny_args(model, text_file, one, *ARGS))
    assert r.returncode == 0, r.stderr
    p = torchrun(*tiny_args(model, text_file, two, *ARGS))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert out.count("wrote ") == 1                     # report printed by rank 0 only
    rep = json.loads((two / "report.json").read_text())
    assert rep["world_size"] == 2
    assert sorted(os.listdir(tmp_path)) == ["one", "tiny-llama", "train.txt", "two"]  # one output dir, no leftovers
    _compare(one, two)
    r1 = json.loads((one / "report.json").read_text())
    assert r1["losses"] == pytest.approx(rep["losses"], rel=1e-5)


def test_two_processes_match_one_with_distillation_and_global_allocation(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    extra = ("--distill-alpha", 0.5, "--distill-temp", 2, "--allocation", "global")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(*tiny_args(model, text_file, one, *ARGS, *extra)).returncode == 0
    p = torchrun(*tiny_args(model, text_file, two, *ARGS, *extra))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    _compare(one, two)
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r1["loss_parts"]["kl"] == pytest.approx(r2["loss_parts"]["kl"], rel=1e-4, abs=1e-7)


def test_odd_batch_is_a_clear_error(tiny_model_dir, text_file, tmp_path):
    p = torchrun(*tiny_args(tiny_model_dir(), text_file, tmp_path / "o", *ARGS[:-4], "--batch-size", 3))
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "must be divisible by the 2 processes" in err


def test_killed_two_process_run_resumes(tiny_model_dir, text_file, tmp_path):
    model = tiny_model_dir()
    args = tiny_args(model, text_file, tmp_path / "run", *ARGS, "--save-every", 2)
    p = torchrun(*args, env={"LORAPRUNE_FAULTS": "delay=0.4"})
    ck = tmp_path / ".run.partial" / "checkpoints" / "step-0000004"
    t0 = time.time()
    while not ck.exists():
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() - t0 < 200
        time.sleep(0.05)
    # torchrun's workers may sit in their own sessions: kill the whole process tree at once
    import psutil

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for q in procs:
        q.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    assert not (tmp_path / "run").exists()
    r = cli("prune", "--resume", tmp_path / "run", "--threads", 1)  # one process: refused, checkpoints kept
    assert r.returncode == 2 and "same number" in r.stderr, r.stderr
    p = torchrun("prune", "--resume", tmp_path / "run", "--threads", 1)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    ref = tmp_path / "ref"
    r = cli(*tiny_args(model, text_file, ref, *ARGS, "--save-every", 2))
    assert r.returncode == 0, r.stderr
    _compare(ref, tmp_path / "run")
