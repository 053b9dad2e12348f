"""What a bench runs: its rows (criterion x schedule x ratio, plus pattern rows), its options, and
each row's PruneConfig and `loraprune prune` flags. No torch: validating a bench is instant."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import CRITERIA, ELEMENT_CRITERIA, SCHEDULES, PruneConfig
from ..core.patterns import parse_pattern
from ..errors import UserError

SCHEMA = "loraprune.bench/1"
ELEMENT_BASELINES = ("magnitude", "wanda")  # element rows that run one-shot, as in their papers
EVAL_LABELS = {"ptb": "PTB", "sotu": "held-out", "sotu-heldout": "held-out"}
PLAIN_ID = "plain-lora-r0"


@dataclass
class Row:
    criterion: str
    schedule: str
    ratio: float
    pattern: str = "structured"   # or N:M / unstructured (docs/sparsity.md)
    steps: int | None = None      # None: the bench budget; 0: one-shot without LoRA recovery
    recipe: str | None = None     # --recipes: the recipe's name, and the flags it sets
    flags: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        if self.ratio == 0 and self.pattern == "structured":
            return PLAIN_ID
        if self.recipe:
            return f"{self.recipe}-r{self.ratio:g}"
        rid = f"{self.criterion}-{self.schedule}" + (f"-r{self.ratio:g}" if self.ratio else "")
        if self.pattern != "structured":
            rid += "-" + self.pattern.replace(":", "of")
        return rid + ("-norec" if self.steps == 0 else "")


@dataclass
class BenchOptions:
    out: str
    model: str | None = None
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.5])
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))
    schedules: list[str] = field(default_factory=lambda: list(SCHEDULES))
    prune_flags: dict = field(default_factory=dict)  # PruneConfig field -> value, same for every row
    evals: list[str] = field(default_factory=lambda: ["ptb", "sotu"])
    eval_ctx: int = 512
    eval_windows: int = 16          # first K windows of each eval text; 0 = all
    zero_shot: list[str] = field(default_factory=list)
    zero_shot_limit: int | None = None
    plain_row: bool = True
    overwrite: bool = False
    resume: bool = False
    keep_adapters: bool = False
    threads: int = 0
    # element sparsity rows (sparse_bench.py): patterns, their criteria, one-shot rows without recovery,
    # and the CPU speed of every exported model
    patterns: list[str] = field(default_factory=lambda: ["structured"])
    element_criteria: list[str] = field(default_factory=lambda: ["lora", "magnitude", "wanda"])
    no_recovery: bool = False
    speed: bool = False
    # named recipes (bench/recipes.py) instead of the criteria x schedules grid, equal CPU time per row
    recipes: list[dict] = field(default_factory=list)
    time_budget: float = 0.0        # CPU seconds of training steps per row (0: --steps for every row)
    probe_steps: int = 6            # steps of the probe run that measures a row's CPU time per step
    zero_shot_sample: int | None = None  # a seeded random N docs per zero-shot task
    jobs: int = 1                   # rows trained side by side (each its own subprocess; --threads each)
    zero_shot_batch_size: int = 1   # lm_eval's batch size (CPU: 8 is about 1.5x faster than 1)

    def rows(self) -> list[Row]:
        plain = Row("lora", "iterative", 0.0, flags={"distill_alpha": 0.0} if self.recipes else {})
        rows = [plain] if self.plain_row else []
        if self.recipes:
            return rows + [Row(*self._recipe_method(r), ratio, recipe=r["name"], flags=dict(r["flags"]))
                           for ratio in self.ratios for r in self.recipes]
        for p in self.patterns:
            if p != "structured":
                rows += element_rows(self, p)
                continue
            for r in self.ratios:
                for c in self.criteria:
                    for s in self.schedules:
                        rows.append(Row(c, s, r))
        return rows

    def _recipe_method(self, recipe: dict) -> tuple[str, str]:
        """(criterion, schedule) of a recipe: its flags, else the shared flags, else prune's defaults."""
        vals = {**self.prune_flags, **recipe["flags"]}
        pattern = vals.get("pattern", "structured")
        default = PruneConfig(pattern=pattern, ratio=0.0 if pattern != "structured" else None)
        return vals.get("criterion") or default.criterion, vals.get("schedule") or default.schedule

    def row_config(self, row: Row, run_dir: Path) -> PruneConfig:
        """The PruneConfig of a row (validated here, before any run starts)."""
        vals = {**self.prune_flags, **row.flags, "model": self.model, "criterion": row.criterion,
                "schedule": row.schedule, "ratio": row.ratio, "out": str(run_dir), "overwrite": True, "export": False,
                "eval_windows": 0}
        if self.patterns != ["structured"] or self.speed:
            vals.update(row_values(self, row))
        if vals.get("base_quant", "none") != "none":
            vals["export"] = True  # its model is the export: LoRA merged into the dequantized weights
        if self.threads:
            vals["threads"] = self.threads
        return PruneConfig.from_dict(vals)


def validate(opts: BenchOptions) -> None:
    if not opts.ratios or any(not 0 < r < 1 for r in opts.ratios):
        raise UserError(f"--ratios {opts.ratios}: give ratios in (0, 1), e.g. 0.2,0.5")
    validate_sparse(opts)
    bad = [c for c in opts.criteria if c not in CRITERIA]
    if bad or not opts.criteria:
        raise UserError(f"--criteria: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(CRITERIA)}")
    bad = [s for s in opts.schedules if s not in SCHEDULES]
    if bad or not opts.schedules:
        raise UserError(f"--schedules: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(SCHEDULES)}")
    if not opts.evals:
        raise UserError("--eval needs at least one of ptb, sotu or a text file")
    if opts.eval_ctx < 2 or opts.eval_windows < 0:
        raise UserError("--eval-ctx must be >= 2 and --eval-windows >= 0")
    if opts.overwrite and opts.resume:
        raise UserError("--overwrite and --resume exclude each other")
    if opts.jobs < 1:
        raise UserError(f"--jobs {opts.jobs}: give at least 1")
    if opts.time_budget < 0 or opts.probe_steps < 2:
        raise UserError("--time-budget must be >= 0 and --probe-steps >= 2")
    if opts.zero_shot_batch_size < 1:
        raise UserError("--zero-shot-batch-size must be >= 1")
    if opts.zero_shot_sample is not None and (opts.zero_shot_sample < 1 or opts.zero_shot_limit is not None):
        raise UserError("--zero-shot-sample must be >= 1 and excludes --zero-shot-limit")
    if opts.zero_shot:
        from ..eval.zeroshot_data import parse_tasks

        zeroshot_api()
        opts.zero_shot = parse_tasks(opts.zero_shot)
    for row in opts.rows():  # every flag combination is a valid prune config
        opts.row_config(row, Path(opts.out) / "runs" / row.id)


def zeroshot_api():
    try:
        import lm_eval  # noqa: F401  (only: is it installed?)
    except ImportError:
        raise UserError("--zero-shot needs lm-evaluation-harness: pip install 'loraprune[eval]'") from None
    from ..eval import zeroshot

    return zeroshot


def config_flags(cfg: PruneConfig) -> list[str]:
    """cfg as prune flags, every field that is set: the subprocess must not fill a field from its own
    defaults, which may differ from this process's (an editable install edited while a long bench
    runs, or another version on PATH)."""
    flags = []
    for k, v in cfg.to_dict().items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            flags += [flag, str(v)]
    return flags


# ---- element-pattern rows (--patterns N:M,unstructured; docs/sparsity.md) ----
def element_rows(opts, pattern: str) -> list:
    rows = []
    for c in opts.element_criteria:
        if c in ELEMENT_BASELINES:
            rows.append(Row(c, "oneshot", 0.0, pattern))
            if opts.no_recovery:
                rows.append(Row(c, "oneshot", 0.0, pattern, steps=0))
        else:
            for s in opts.schedules:
                rows.append(Row(c, s, 0.0, pattern))
                if s == "oneshot" and opts.no_recovery:
                    rows.append(Row(c, s, 0.0, pattern, steps=0))
    return rows


def row_values(opts, row) -> dict:
    """PruneConfig values a row adds to the bench's common flags."""
    vals = {"pattern": row.pattern}
    if row.pattern != "unstructured":
        vals["sparsity"] = None  # --sparsity (passed to every row) belongs to the unstructured rows
    elif "sparsity" in opts.prune_flags:
        vals["sparsity"] = opts.prune_flags["sparsity"]
    if row.steps is not None:
        vals["steps"] = row.steps
    if opts.speed:
        vals["export"] = True
    return vals


def validate_sparse(opts) -> None:
    for p in opts.patterns:
        parse_pattern(p, 0.5)
    bad = [c for c in opts.element_criteria if c not in ELEMENT_CRITERIA]
    if bad or (not opts.element_criteria and opts.patterns != ["structured"]):
        raise UserError(f"--element-criteria: unknown {', '.join(bad) or '(none)'}; choose from "
                        f"{', '.join(ELEMENT_CRITERIA)}")
    if "structured" not in opts.patterns:
        opts.criteria = [c for c in opts.criteria if c != "wanda"] or ["lora"]  # unused by element rows
