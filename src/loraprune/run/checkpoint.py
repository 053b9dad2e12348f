"""Resumable checkpoints of a pruning run, written atomically (temp dir + rename), last K kept.

A checkpoint holds everything the loop needs to continue bit-for-bit: LoRA weights (safetensors),
optimizer and LR-scheduler state, masks, importance EMA, step, data position, loss history and RNG
states (python, numpy, torch). Nothing is unpickled on load: `torch.load(weights_only=True)` reads
only tensors and plain containers.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

PREFIX = "step-"


def rng_state() -> dict:
    st = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [st[0], torch.from_numpy(st[1].astype(np.int64)), int(st[2]), int(st[3]), float(st[4])]}


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


def save(ckpt_root: Path, step: int, *, lora: dict[str, torch.Tensor], state: dict, masks, keep: int) -> Path:
    """Write checkpoint `step` (a directory: lora.safetensors, state.pt, masks.json, meta.json), then
    delete all but the newest `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:07d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
    torch.save(state, tmp / "state.pt")
    masks.save(tmp / "masks.json")
    (tmp / "meta.json").write_text(json.dumps({"step": step}) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "meta.json").is_file())


def load(ckpt: Path) -> tuple[dict, dict]:
    """(lora tensors, state) of a checkpoint directory."""
    try:
        lora = load_file(str(ckpt / "lora.safetensors"))
        state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    except Exception as err:
        raise UserError(f"checkpoint {ckpt} is unreadable ({type(err).__name__}); delete it to fall back "
                        "to the previous one") from None
    return lora, state


def latest(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def save_job(job) -> Path | None:
    """Checkpoint the run after step `job.step` (rank 0 writes; every rank waits)."""
    from peft import get_peft_model_state_dict

    path = None
    if job.dist.main:
        st = {"step": job.step, "world": job.dist.world, "optim": job.optim.state_dict(),
              "sched": job.sched.state_dict(), "stream": job.stream.state_dict(), "rng": rng_state(),
              "dense_ppl": job.dense_ppl, **job.history.state_dict()}
        for p in job.prunings:
            st[p.state_key] = p.state_dict()
        path = save(job.paths.ckpt_root, job.step, lora=get_peft_model_state_dict(job.model), state=st,
                    masks=job.masks, keep=job.cfg.keep_checkpoints)
    job.dist.barrier()
    return path


def restore_job(job, ckpt: Path, lora: dict, state: dict) -> None:
    """Put the run back where checkpoint `ckpt` left it (after build, before the loop)."""
    from peft import set_peft_model_state_dict

    from ..core.masks import MaskSet

    set_peft_model_state_dict(job.model, lora)
    job.optim.load_state_dict(state["optim"])
    job.sched.load_state_dict(state["sched"])
    for p in job.prunings:
        p.load_state_dict(state[p.state_key])
    job.masks.load_layers(MaskSet.load(ckpt / "masks.json", job.spec))
    job.stream.load_state_dict(state["stream"])
    job.history.load_state_dict(state)
    set_rng_state(state["rng"])
    job.step = int(state["step"])
