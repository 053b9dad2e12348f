"""The `loraprune` command line. Each subcommand lives in loraprune/cli/<name>.py and exposes
`register(subparsers)` which adds its parser with `func=run`. The CLI prints; the library logs.
Bad input (UserError) -> one line on stderr, exit code 2.

Start-up is cheap: building the parser imports no torch or transformers (config.py holds names
only), so `--help` and argument errors answer at once; `run` imports what a command needs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import UserError

COMMANDS = ("prune", "export", "eval", "bench", "bench_speed", "bench_memory", "verify_sparsity")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="loraprune", description="LoRA-guided structured pruning of causal LMs (LoRAPrune).")
    p.add_argument("--version", action="version", version=f"loraprune {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log library details to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"loraprune.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"loraprune.cli.{name}":
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"loraprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraprune: interrupted", file=sys.stderr)
        return 130


def _quiet_third_party() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes' int8 eval path logs a cast notice on every call of every layer
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
