"""The run directory: the hidden `.NAME.partial/` a run works in, resuming, and the final write
(compact model, adapter, masks, config, report) followed by the rename into place."""
from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

from .errors import UserError
from .schedule import ramp_bounds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def resolve_resume(run_dir: str) -> tuple[Path, Path]:
    """(out, partial) for --resume: accepts the --out path or the partial directory itself."""
    p = Path(run_dir).expanduser()
    if p.name.startswith(".") and p.name.endswith(".partial"):
        out = p.parent / p.name[1:-len(".partial")]
    else:
        out = p
    part = partial_dir(out)
    if (out / "report.json").is_file() and not part.exists():
        raise UserError(f"{out} is a finished run; nothing to resume")
    if not (part / "loraprune_config.json").is_file():
        raise UserError(f"no unfinished run to resume at {out} (expected {part}/)")
    return out, part


def write_outputs(cfg, model, masks, tokenizer, spec, part: Path, out: Path, *, params_dense, losses,
                  step_times, dense_ppl, pruned_ppl, eval_meta, history, t0, n_seqs, world, epruner=None,
                  step_cpu=None) -> dict:
    from .element_prune import write_element_outputs
    from .report import build_report, write_report

    export_info = None
    if cfg.export:
        from .export import export_compact

        export_info = export_compact(model, masks, part, tokenizer=tokenizer, uniform=cfg.uniform,
                                     save_dtype=cfg.save_dtype,
                                     element_masks=epruner.emasks if epruner is not None else None)
    model.save_pretrained(part / "adapter")
    masks.save(part / "masks.json")
    cfg.save(part / "loraprune_config.json")
    report = build_report(
        cfg=cfg, spec=spec, masks=masks, params_dense=params_dense, losses=losses, step_times=step_times,
        dense_ppl=dense_ppl, pruned_ppl=pruned_ppl, eval_meta=eval_meta, history=history,
        export_info=export_info, wall_s=time.time() - t0, peak_rss_mb=peak_rss_mb(), n_train_seqs=n_seqs,
        ramp=ramp_bounds(cfg.steps, cfg.warmup_frac, cfg.cooldown_frac))
    report["world_size"] = world
    report["mean_step_cpu_s"] = sum(step_cpu) / len(step_cpu) if step_cpu else None
    if epruner is not None:  # element_masks.safetensors + .json, report["sparsity"]
        write_element_outputs(epruner, masks, part, report)
    shutil.rmtree(part / "checkpoints", ignore_errors=True)  # the finished run needs none
    write_report(report, part)  # report.json last: marks the directory complete
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        part.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        part.rename(out)
    report["out"] = str(out)
    return report
