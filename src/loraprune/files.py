"""Files that appear whole or not at all, and output directories checked before any work.

Every writer in loraprune goes through these: a file is written to a temporary name in the same
directory and renamed into place (os.replace is atomic on POSIX); a directory is filled under a
hidden temporary name and renamed into place when complete. A killed process leaves only hidden
`.NAME.tmp-*` entries, never a half-written file under the real name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically, with a normal file mode (mkstemp makes 0600)."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def write_json(path: str | Path, obj, **dump_kw) -> Path:
    return write_text(path, json.dumps(obj, indent=2, **dump_kw) + "\n")


def read_json(path: str | Path):
    """The JSON document at `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory `src` to `dst`, replacing what was there, with `dst` never absent
    for longer than two renames."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_dir(out: str | Path, keep_existing: bool = False):
    """Yield a temp dir next to `out`; on success it replaces `out` (or, with keep_existing, is
    dropped when another process created `out` meanwhile: caches), on any error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing and out.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        replace_dir(tmp, out)
    except OSError:
        if not (keep_existing and out.exists()):  # lost a race with another writer of a cache
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable_parent(path: str | Path, flag: str) -> Path:
    """Fail early when nothing can be created at `path` (its nearest existing ancestor is not a
    writable directory). A real probe: os.access says yes to root even on read-only mounts."""
    p = Path(path).expanduser()
    probe = p.parent if str(p.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise OSError(f"{probe} is not a directory")
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as err:
        raise UserError(f"{flag} {path} is not writable ({err})") from None
    return p


def check_out_dir(out: str, overwrite: bool) -> Path:
    """Fail early (before any work) when --out cannot be used."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite or choose another directory")
    return check_writable_parent(p, "--out")
