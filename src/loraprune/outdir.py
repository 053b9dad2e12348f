"""Atomic output directories: write everything into a hidden temp dir next to the target and
rename it into place only when complete. A killed run leaves only a `.name.tmp-*` directory."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

DONE_MARKER = "report.json"  # written last; its presence means the directory is complete


def check_out_dir(out: str, overwrite: bool) -> Path:
    """Fail early (before any work) when --out cannot be used."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite or choose another directory")
    parent = p.parent if p.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    try:  # a real probe: os.access says yes to root even on read-only mounts
        if not probe.is_dir():
            raise OSError(f"{probe} is not a directory")
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as err:
        raise UserError(f"--out {out} is not writable ({err})") from None
    return p


@contextmanager
def atomic_dir(out: Path):
    """Yield a temp dir; on success replace `out` with it, on any error remove it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
