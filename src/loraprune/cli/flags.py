"""PruneConfig fields as command-line flags (--field-name), shared by `prune` and `bench`."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ..core.config import PruneConfig


def add_config_flags(p, skip: frozenset | set = frozenset()) -> None:
    """One flag per PruneConfig field (its help and default from the field); all default to None, so
    that only the flags given on the command line override a --config file or the dataclass."""
    for f in fields(PruneConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_ = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")  # None: help says
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        typ = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=typ, default=None, metavar=f.name.upper(), help=help_)


def given_flags(args: argparse.Namespace, skip: frozenset | set = frozenset()) -> dict:
    """field -> value of the config flags given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(PruneConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}
