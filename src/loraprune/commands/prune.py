"""`loraprune prune`: flags map one-to-one to PruneConfig fields."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import MISSING, fields

from ..config import PruneConfig, load_config_file
from ..errors import UserError


def add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(PruneConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_} (default: {default})")
            continue
        typ = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=typ, default=None, metavar=f.name.upper(),
                       help=f"{help_} (default: {default})")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """Defaults <- --config FILE <- explicit flags."""
    values = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for f in fields(PruneConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return PruneConfig.from_dict(values)


def register(sub) -> None:
    p = sub.add_parser("prune", help="LoRA fine-tune while pruning heads and FFN channels; write a compact model",
                       description="Attach LoRA, fine-tune, score units from LoRA weights and gradients, mask the "
                                   "least important ones on a cubic ramp, then merge LoRA and slice the model.")
    p.add_argument("--config", help="YAML or JSON file of flag values (flags given here override it)")
    add_config_flags(p)
    p.set_defaults(func=run)


class _Progress:
    """tqdm bar for training and evaluation, phase lines on stderr."""

    def __init__(self):
        from tqdm.auto import tqdm

        self.tqdm = tqdm
        self.bar = None
        self.t0 = time.time()

    def phase(self, name):
        self.close()
        print(f"[{time.time() - self.t0:6.1f}s] {name}", file=sys.stderr, flush=True)

    def step(self, step, total, m):
        if self.bar is None:
            self.bar = self.tqdm(total=total, desc="prune", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", ratio=f"{m['ratio']:.3f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args) -> int:
    cfg = config_from_args(args)
    from ..report import render_markdown
    from ..train import Hooks, TrainingDiverged, prune
    from ..pruner import NonFiniteScores

    prog = _Progress()
    try:
        report = prune(cfg, Hooks(on_step=prog.step, on_phase=prog.phase))
    except (TrainingDiverged, NonFiniteScores) as err:
        prog.close()
        raise UserError(f"{err}; nothing was written to {cfg.out}") from None
    prog.close()
    print(render_markdown(report))
    print(f"wrote {report['out']}")
    return 0
