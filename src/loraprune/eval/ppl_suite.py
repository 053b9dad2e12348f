"""The perplexity suite: which text, which split, how it is joined, and one record per number.

Sources and their default splits (``--split`` overrides it for the named corpora):
  ptb        Penn Treebank (Mikolov) from `treebank`: test (also valid, train); one document per
             sentence line (test: 3761 sentences, 105,807 SmolLM2 tokens, 206 windows of 512)
  sotu       the held-out State of the Union speeches (data.SOTU_HOLDOUT_RULE), never trained on by
             default; `sotu-heldout` is the same text
  wikitext2  wikitext-2-raw-v1 through `datasets` (online only): test (also validation, train)
  c4         allenai/c4 en through `datasets` (online only): validation
  FILE       a local .txt (whole file) or .jsonl (one document per line, field "text")
Documents are joined with "\\n\\n" (data.JOIN), tokenized once without special tokens, then scored
with ppl.perplexity (non-overlapping windows of ctx tokens). The record states all of it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as data_mod
from ..errors import UserError
from .ppl import perplexity

PROTOCOL = ("non-overlapping windows of ctx tokens (tail dropped), no BOS, each window scored "
            "independently; ppl = exp(mean NLL over the ctx-1 predictions of every window used)")

NAMED = {  # name -> (default split, accepted splits, aliases)
    "ptb": ("test", ("train", "valid", "test"), {"validation": "valid"}),
    "sotu": ("heldout", ("heldout", "train"), {"test": "heldout", "valid": "heldout", "validation": "heldout"}),
    "sotu-heldout": ("heldout", ("heldout",), {"test": "heldout"}),
    "wikitext2": ("test", ("train", "validation", "test"), {"valid": "validation"}),
    "c4": ("validation", ("train", "validation"), {"valid": "validation", "test": "validation"}),
}


def parse_sources(spec: str | list[str] | None) -> list[str]:
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise UserError("--ppl needs at least one source: ptb, sotu, wikitext2, c4 or a text file")
    return items


def resolve_split(source: str, split: str | None) -> str:
    """The split actually used for `source` ("file" for local files), or UserError (also for a
    missing file, so callers can check every source before loading a model)."""
    if source not in NAMED:
        path = Path(source).expanduser()
        if not path.is_file():
            hint = "does not exist" if ("/" in source or "." in path.name) else "is no such file"
            raise UserError(f"--ppl {source} {hint}; use ptb, sotu, wikitext2, c4 or a text file")
        return "file"
    default, allowed, aliases = NAMED[source]
    if split is None:
        return default
    s = aliases.get(split, split)
    if s not in allowed:
        raise UserError(f"--split {split} does not exist for {source}; choose one of {', '.join(allowed)}")
    return s


def load_ppl_text(source: str, split: str | None = None, text_field: str = "text") -> tuple[str, dict]:
    """Return (joined text, provenance dict) for one perplexity source."""
    split = resolve_split(source, split)
    if source in NAMED:
        docs = data_mod.load_documents(source, split, text_field)
        meta = {"dataset": "sotu" if source.startswith("sotu") else source, "split": split}
    else:
        path = Path(source).expanduser()
        docs = data_mod.load_documents(str(path), "train", text_field)
        meta = {"dataset": path.name, "split": "file", "path": str(path.resolve())}
    text = data_mod.join_documents(docs)
    meta.update({"documents": len(docs), "join": data_mod.JOIN, "chars": len(text),
                 "content_sha256_16": data_mod.content_hash(text)})
    if meta["dataset"] == "sotu":
        meta["heldout_rule"] = data_mod.SOTU_HOLDOUT_RULE if split == "heldout" else None
    return text, meta


def check_ctx(model, ctx: int) -> None:
    if ctx < 2:
        raise UserError(f"--ctx must be at least 2 tokens, got {ctx}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and ctx > max_pos:
        raise UserError(f"--ctx {ctx} exceeds the model's context of {max_pos} tokens")


@dataclass(frozen=True)
class PplSettings:
    """How one perplexity number is measured (every field is recorded with it)."""
    split: str | None = None        # None: the source's default split
    ctx: int = 512                  # window length in tokens
    max_windows: int | None = None  # the first K windows (None: all)
    batch_size: int = 1             # windows per forward pass (speed only)
    dtype: str = "fp32"
    seed: int = 0
    text_field: str = "text"        # .jsonl field


def ppl_record(model, tokenizer, source: str, settings: PplSettings = PplSettings(), *,
               model_label: str | None = None, progress=None) -> dict:
    """Measure one perplexity number and return its record (see docs/results-format.md).

    `progress`, if given, has `start(n_windows)` (called once the number of windows is known) and
    `update(n)` (after every batch): the CLI draws a bar with them."""
    st = settings
    check_ctx(model, st.ctx)
    if st.max_windows is not None and st.max_windows < 1:
        raise UserError(f"--max-windows must be >= 1, got {st.max_windows}")
    if st.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {st.batch_size}")
    t0 = time.time()
    text, meta = load_ppl_text(source, st.split, st.text_field)
    ids = data_mod.tokenize_text(tokenizer, text)
    available = ids.numel() // st.ctx
    if available == 0:
        raise UserError(f"{meta['dataset']} ({meta['split']}) has {ids.numel()} tokens, fewer than one "
                        f"window of --ctx {st.ctx}; use a smaller --ctx or more text")
    if progress is not None:
        progress.start(min(available, st.max_windows) if st.max_windows else available)
    torch.manual_seed(st.seed)  # scoring is deterministic; the seed is set and recorded anyway
    res = perplexity(model, ids, st.ctx, st.max_windows, batch_size=st.batch_size,
                     progress=progress.update if progress is not None else None)
    return {"kind": "perplexity", "model": model_label, **meta, "tokenizer_tokens": int(ids.numel()),
            "ctx": st.ctx, "windows": res["windows"], "windows_available": res["windows_available"],
            "max_windows": st.max_windows, "tokens_scored": res["tokens"], "nll": res["nll"], "ppl": res["ppl"],
            "batch_size": st.batch_size, "dtype": st.dtype, "seed": st.seed,
            "harness": "loraprune.ppl", "harness_version": _version(), "protocol": PROTOCOL,
            "wall_s": round(time.time() - t0, 2)}


def _version() -> str:
    from .. import __version__

    return __version__
