"""The run directory: the hidden `.NAME.partial/` a run works in, resuming, and the final write
(compact model, adapter, masks, config, report) followed by the rename into place.

report.json is written last and marks a directory complete (`DONE`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError
from ..files import check_out_dir, replace_dir
from . import checkpoint

DONE = "report.json"


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
    if (out / DONE).is_file() and not part.exists():
        raise UserError(f"{out} is a finished run; nothing to resume")
    if not (part / "loraprune_config.json").is_file():
        raise UserError(f"no unfinished run to resume at {out} (expected {part}/)")
    return out, part


def open_run_dir(cfg, resume: str | None, main: bool) -> tuple[Path, Path]:
    """(out, partial) of a new run (checked, a stale partial dir refused or removed) or a resumed one."""
    if resume:
        return resolve_resume(resume)
    out = check_out_dir(cfg.out, cfg.overwrite)
    part = partial_dir(out)
    if part.exists():
        if not cfg.overwrite:
            raise UserError(f"an unfinished run is in {part}; continue it with --resume {cfg.out} "
                            "or start over with --overwrite")
        if main:
            shutil.rmtree(part)
    return out, part


def discard_unless_resumable(part: Path) -> None:
    """After a failure: keep the partial directory only when it holds a checkpoint worth resuming."""
    if part.exists() and not checkpoint.list_checkpoints(part / "checkpoints"):
        shutil.rmtree(part, ignore_errors=True)


def write_outputs(job, pruned_ppl: dict | None) -> dict:
    """Everything a finished run leaves, in the partial dir, then renamed to --out; returns the report."""
    from .report import build_report, write_report

    cfg, part = job.cfg, job.paths.part
    export_info = None
    if cfg.export:
        from ..export.compact import export_compact

        handoff = job.handoff()
        export_info = export_compact(job.model, handoff.pop("masks"), part, tokenizer=job.tokenizer,
                                     uniform=cfg.uniform, save_dtype=cfg.save_dtype, save_quant=cfg.save_quant,
                                     **handoff)
    job.model.save_pretrained(part / "adapter")
    job.masks.save(part / "masks.json")
    cfg.save(part / "loraprune_config.json")
    report = build_report(job, export_info, pruned_ppl)
    for p in job.prunings:
        p.describe(report)
    for p in job.prunings:
        p.write(part, report)
    shutil.rmtree(part / "checkpoints", ignore_errors=True)  # the finished run needs none
    write_report(report, part)  # report.json last: marks the directory complete
    replace_dir(part, job.paths.out)
    report["out"] = str(job.paths.out)
    return report
