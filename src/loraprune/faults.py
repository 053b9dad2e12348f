"""Test-only fault injection: off unless the environment variable LORAPRUNE_FAULTS is set; no flag
or config field reaches it.

LORAPRUNE_FAULTS is a comma list of
  nan-loss@K    the training loss of optimizer step K is NaN (as if the forward had overflowed)
  nan-score@K   the importance scores observed after the backward of step K are NaN (K = 0: the
                oneshot calibration's)
  delay=S       sleep S seconds after every optimizer step (so a test can kill a run at a chosen point)
The tests use it to reach the divergence and interruption paths deterministically: a NaN produced
by a huge learning rate depends on the CPU's floating-point kernels (on one machine --lr 1e12
saturates at a finite loss instead).
"""
from __future__ import annotations

import math
import os
import time

ENV = "LORAPRUNE_FAULTS"


def _parse(text: str) -> dict:
    out: dict = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.startswith("delay="):
            out["delay"] = float(item.split("=", 1)[1])
            continue
        name, _, step = item.partition("@")
        if name not in ("nan-loss", "nan-score") or not step.isdigit():
            raise ValueError(f"{ENV}: cannot parse {item!r} (nan-loss@K, nan-score@K or delay=S)")
        out[name] = int(step)
    return out


_ACTIVE = _parse(os.environ.get(ENV, ""))


def loss(value: float, step: int) -> float:
    """The loss of `step`, or NaN when the test asked for it."""
    return math.nan if _ACTIVE.get("nan-loss") == step else value


def scores(step: int) -> bool:
    """Whether the scores observed at `step` are to be made NaN."""
    return _ACTIVE.get("nan-score") == step


def after_step() -> None:
    if _ACTIVE.get("delay"):
        time.sleep(_ACTIVE["delay"])
