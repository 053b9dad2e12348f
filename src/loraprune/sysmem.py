"""Process memory, measured one way everywhere: the peak resident set of this process image.

Linux: VmHWM from /proc/self/status, which exec resets. `getrusage(RUSAGE_SELF).ru_maxrss` is NOT
used on Linux: it survives execve, so a subprocess started by a large parent (a bench that has
evaluated a model) would report the parent's peak when that was larger than its own. Elsewhere
ru_maxrss is the fallback (kilobytes on Linux-likes, bytes on macOS).
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def rss_mb() -> float:
    """Current resident set size (MB); the peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mb()


def reset_peak() -> bool:
    """Restart the peak (VmHWM) from the current RSS (Linux: /proc/self/clear_refs); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
