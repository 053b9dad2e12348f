"""The tuning texts: defaults are chosen on these, never on the evaluation texts (the held-out SOTU
speeches and PTB test stay evaluation-only).

    python benchmarks/recovery/tune/make_splits.py OUT_DIR

writes OUT_DIR/train.txt   the SOTU training speeches minus every 10th of them (in file order),
       OUT_DIR/val.txt     those every-10th training speeches (in-domain validation),
       OUT_DIR/ptb_valid.txt  PTB's validation split (out-of-domain validation), one sentence per
                              document, joined by a blank line like every source.
"""
from __future__ import annotations

import sys
from pathlib import Path

from loraprune import data


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    train = data.sotu_documents("train")
    val = [s for k, s in enumerate(train) if k % 10 == 0]
    rest = [s for k, s in enumerate(train) if k % 10 != 0]
    (d / "train.txt").write_text(data.join_documents(rest) + "\n")
    (d / "val.txt").write_text(data.join_documents(val) + "\n")
    (d / "ptb_valid.txt").write_text(data.join_documents(data.load_documents("ptb", "valid")) + "\n")
    print(f"{len(rest)} training speeches, {len(val)} validation speeches, PTB valid -> {d}")


if __name__ == "__main__":
    main(sys.argv[1])
