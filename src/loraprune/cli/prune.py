"""`loraprune prune`: flags map one-to-one to PruneConfig fields."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from ..core.config import PruneConfig, load_config_file
from ..errors import UserError
from .flags import add_config_flags, given_flags


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """Defaults <- --config FILE <- explicit flags."""
    values = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    values.update(given_flags(args))
    return PruneConfig.from_dict(values)


def register(sub) -> None:
    p = sub.add_parser("prune", help="LoRA fine-tune while pruning heads and FFN channels; write a compact model",
                       description="Attach LoRA, fine-tune, score units from LoRA weights and gradients, mask the "
                                   "least important ones on a cubic ramp, then merge LoRA and slice the model.")
    p.add_argument("--config", help="YAML or JSON file of flag values (flags given here override it)")
    p.add_argument("--resume", metavar="OUT", help="continue the unfinished run whose --out was OUT from its last "
                   "checkpoint, with its saved config (only --threads may be given alongside)")
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
        self.bar.set_postfix(loss=f"{m['loss']:.3f}", ratio=f"{m.get('ratio', 0.0):.3f}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def resume_config(args) -> PruneConfig:
    from ..run.rundir import resolve_resume

    given = [f.name for f in fields(PruneConfig) if getattr(args, f.name, None) is not None and f.name != "threads"]
    if given or args.config:
        flags = ", ".join("--" + n.replace("_", "-") for n in given) or "--config"
        raise UserError(f"--resume continues with the run's saved config; drop {flags}")
    _, part = resolve_resume(args.resume)
    cfg = PruneConfig.from_file(str(part / "loraprune_config.json"))
    if args.threads is not None:
        cfg.threads = args.threads
    return cfg


def run(args) -> int:
    cfg = resume_config(args) if args.resume else config_from_args(args)
    from ..core.pruning import NonFiniteScores
    from ..run import Hooks, RunInterrupted, TrainingDiverged, prune
    from ..run.dist import init_from_env, shutdown
    from ..run.report import render_markdown

    main_rank = init_from_env().main
    prog = _Progress() if main_rank else None
    hooks = Hooks(on_step=prog.step, on_phase=prog.phase) if prog else Hooks()
    try:
        report = prune(cfg, hooks, resume=args.resume, handle_signals=True)
    except (TrainingDiverged, NonFiniteScores) as err:
        raise UserError(str(err)) from None
    except RunInterrupted as err:
        print(f"loraprune: {err}", file=sys.stderr)
        return 130
    finally:
        if prog:
            prog.close()
        shutdown()
    if main_rank:
        print(render_markdown(report))
        print(f"wrote {report['out']}")
    return 0
