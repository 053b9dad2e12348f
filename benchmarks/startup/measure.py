"""Start-up time of the loraprune CLI: median of N runs of each command in a fresh process.

    python benchmarks/startup/measure.py [--src DIR] [--runs 5] [--json OUT]

--src runs `python -m loraprune` from another checkout's src/ (e.g. a `git worktree` of an older
commit) with this interpreter, so before/after are measured with the same packages, side by side.
Wall time on a shared machine is noisy: compare medians measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import loraprune": ["-c", "import loraprune"],
    "loraprune --help": ["-m", "loraprune", "--help"],
    "loraprune prune --help": ["-m", "loraprune", "prune", "--help"],
    "loraprune eval --help": ["-m", "loraprune", "eval", "--help"],
    "loraprune prune --bogus (exit 2)": ["-m", "loraprune", "prune", "--bogus"],
}


def time_once(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", default=[], help="checkout src/ dirs to compare (label=DIR)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    trees = [("installed", None)] + [tuple(s.split("=", 1)) if "=" in s else (s, s) for s in a.src]
    out = {"runs": a.runs, "python": sys.version.split()[0], "cpu_count": os.cpu_count(), "results": {}}
    for label, src in trees:
        env = {**os.environ}
        if src:
            env["PYTHONPATH"] = src
        res = {}
        for name, args in COMMANDS.items():
            times = [time_once(args, env) for _ in range(a.runs)]
            res[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                         "max_s": round(max(times), 3)}
        out["results"][label] = res
    width = max(map(len, COMMANDS))
    print(f"{'command':{width}}  " + "  ".join(f"{label:>18}" for label, _ in trees))
    for name in COMMANDS:
        cells = [f"{out['results'][label][name]['median_s']:8.2f} s (median)" for label, _ in trees]
        print(f"{name:{width}}  " + "  ".join(cells))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
