"""The one configuration dataclass. Every field is a CLI flag (--field-name) and is saved as
JSON with every output."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError

# Names only (this module imports no torch, so the CLI's --help is fast); the registries that build
# them are core/criteria/__init__.py and core/criteria/element.py (a test keeps them equal).
CRITERIA = ("lora", "mask-taylor", "taylor", "magnitude", "activation", "random")
ELEMENT_CRITERIA = ("lora", "magnitude", "wanda")  # criteria of --pattern N:M / unstructured
IMPORTANCE = ("squared", "abs-norm")
LORA_PROJECTIONS = ("all", "rows")
SCHEDULES = ("iterative", "oneshot")
ALLOCATIONS = ("uniform", "global")
QUANTS = ("none", "int8", "nf4")       # --base-quant / --save-quant (bitsandbytes; core/quant.py)
DTYPES = ("fp32", "bf16", "fp16")      # every dtype name loraprune accepts (models.torch_dtype maps them)
DTYPE_CHOICES = ("fp32", "bf16")       # compute dtypes of training (bf16 = autocast)
SAVE_DTYPES = DTYPES
TARGETS = ("heads", "ffn")
UNIT_FORM = {"wanda": "activation"}    # element criteria whose structured form has another name


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneConfig:
    # what to prune
    model: str | None = _f(None, "HF model directory or hub id; default: the embedded SmolLM2-135M")
    data: str | None = _f(None, "training text: sotu (default), ptb, wikitext2, c4, hf:NAME, FILE.txt, FILE.jsonl")
    text_field: str = _f("text", "field holding the text in .jsonl files / hf: datasets")
    ratio: float = _f(None, "fraction of each pruned layer's units removed (heads and FFN channels), in [0, 1); "
                            "default 0.2 with --pattern structured, 0 (no unit pruning) with an element pattern")
    pattern: str = _f("structured", "structured (units, --ratio), N:M (N of every M consecutive weights along the "
                      "input dimension are zero, e.g. 2:4; applied to what --ratio keeps) or unstructured "
                      "(--sparsity of each projection's weights); see docs/sparsity.md")
    sparsity: float = _f(None, "element sparsity of --pattern unstructured (default 0.5); N:M implies N/M")
    targets: str = _f("heads,ffn", "which units to prune: heads, ffn or heads,ffn")
    skip_layers: str = _f("auto", "layers never pruned: auto (first 10%% and the last), none, or e.g. 0-2,29")
    round_to: int = _f(1, "keep FFN channel counts a multiple of N per layer (chosen by the criterion)")
    allocation: str = _f("uniform", "uniform: every pruned layer loses the same fraction (paper); global: the same "
                         "total number of heads and channels, ranked across layers on scores relative to "
                         "their layer's mean (core/allocation.py)", choices=ALLOCATIONS)
    min_keep: float = _f(0.1, "with --allocation global: every pruned layer keeps at least this fraction of its "
                         "heads and of its FFN channels")
    # how to score and when to mask
    criterion: str = _f(None, "importance criterion: " + ", ".join(CRITERIA) + "; lora is the paper's. Unset: "
                        "mask-taylor for structured pruning (the tuned recipe, benchmarks/recovery), lora for "
                        "--pattern N:M / unstructured", choices=CRITERIA)
    importance: str = _f("squared", "lora element importance: squared (paper) or abs-norm (reference code)",
                         choices=IMPORTANCE)
    lora_projections: str = _f("all", "projections the lora criterion sums a unit's importance over: all seven "
                               "(paper) or rows (only q,k,v,gate,up, where the unit owns output rows; at B = 0 "
                               "the LoRA gradient estimate mixes units in the columns of o_proj and down_proj; "
                               "see docs/benchmarks.md)", choices=LORA_PROJECTIONS)
    ema: float = _f(0.9, "moving-average factor lambda for importance: I <- lambda*I + (1-lambda)*I_new")
    schedule: str = _f(None, "iterative (mask during fine-tuning; the paper's) or oneshot (score, prune, "
                       "fine-tune). Unset: oneshot for structured pruning (tuned), iterative for element patterns",
                       choices=SCHEDULES)
    prune_every: int = _f(5, "update the masks every N optimizer steps during the ramp")
    warmup_frac: float = _f(0.1, "fraction of steps before pruning starts")
    cooldown_frac: float = _f(0.2, "fraction of steps at the final ratio at the end (recovery)")
    calib_batches: int = _f(4, "batches used to score for the oneshot schedule")
    # LoRA fine-tuning
    steps: int = _f(50, "optimizer steps of LoRA fine-tuning")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lr: float = _f(3e-3, "peak AdamW learning rate of the LoRA weights (tuned: benchmarks/recovery/tune)")
    distill_alpha: float = _f(0.5, "self-distillation weight a: loss = (1-a) CE + a T^2 KL(teacher || student); "
                              "the teacher is the dense base (LoRA off, masks open) on the same batch; 0: off "
                              "(the paper's plain CE)")
    distill_temp: float = _f(1.0, "distillation temperature T")
    head_chunk: int = _f(256, "tokens per chunk of the LM head + loss (the [tokens, vocab] logits never exist "
                         "at once)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_warmup_steps: int = _f(5, "linear learning-rate warm-up steps (then cosine decay to 10%%)")
    seq_len: int = _f(256, "tokens per training sequence")
    batch_size: int = _f(4, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    dtype: str = _f("fp32", "compute dtype: fp32, or bf16 (autocast, fp32 master weights)",
                    choices=DTYPE_CHOICES)
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    base_quant: str = _f("none", "load the frozen base quantized: none, int8 or nf4 (bitsandbytes); criteria read "
                         "the dequantized weights, the export merges LoRA into them in float (core/quant.py)",
                         choices=QUANTS)
    seed: int = _f(0, "seed for data order, LoRA init and random choices")
    # evaluation in the report
    eval_data: str = _f("sotu-heldout,ptb", "held-out texts (comma list) for the dense-vs-pruned perplexity in the "
                        "report: the first in-domain, e.g. ptb as an out-of-domain check")
    eval_ctx: int = _f(512, "perplexity window length in tokens")
    eval_windows: int = _f(8, "perplexity windows (first K non-overlapping windows); 0 to skip")
    # output
    out: str = _f("loraprune-out", "output directory")
    overwrite: bool = _f(False, "replace a non-empty --out")
    export: bool = _f(True, "write the compact (merged, sliced) model; --no-export keeps only adapter + masks")
    uniform: bool = _f(False, "every layer keeps the same counts (no skipped layers): a stock config")
    save_dtype: str = _f("fp32", "dtype of the saved weights: fp32, bf16, fp16", choices=SAVE_DTYPES)
    save_quant: str = _f("none", "re-quantize the compact model on save: none, int8 or nf4 (bitsandbytes; loads "
                         "with from_pretrained and bitsandbytes installed)", choices=QUANTS)
    trust_remote_code: bool = _f(False, "allow custom modeling code of the --model you pass")
    threads: int = _f(0, "torch threads (0: torch's default)")
    # long runs
    save_every: int = _f(25, "checkpoint every N steps (0: only on SIGTERM/SIGINT); see --resume")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    debug_sync: bool = _f(False, "data parallel: check after every mask update that all ranks agree")

    def __post_init__(self):
        self.resolve()
        self.validate()

    def resolve(self) -> None:
        """Fill what depends on other fields (idempotent: a saved config resolves to itself):
        the pattern's defaults (docs/sparsity.md), the default criterion and schedule (structured
        pruning: the tuned mask-taylor oneshot; element patterns: lora iterative, never re-tuned) and
        --uniform's layer set."""
        self._resolve_pattern()
        structured = self.pattern == "structured"
        if self.criterion is None:
            self.criterion = "mask-taylor" if structured else "lora"
        if self.schedule is None:
            self.schedule = "oneshot" if structured else "iterative"
        if self.uniform and self.skip_layers == "auto":
            self.skip_layers = "none"  # --uniform means every layer is pruned alike

    def validate(self) -> None:
        """Check every field; changes nothing."""
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"--ratio {self.ratio} is outside [0, 1): it is the fraction of units removed")
        if self.steps < 0 or (self.steps == 0 and self.schedule != "oneshot"):
            raise UserError("--steps must be at least 1 (0 only with --schedule oneshot: prune without recovery)")
        for name in ("prune_every", "lora_r", "seq_len", "batch_size", "grad_accum", "round_to",
                     "calib_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise UserError("--save-every must be >= 0 and --keep-checkpoints >= 1")
        if self.eval_windows < 0 or self.eval_ctx < 2:
            raise UserError("--eval-windows must be >= 0 and --eval-ctx >= 2")
        if not 0.0 <= self.ema < 1.0:
            raise UserError(f"--ema {self.ema} is outside [0, 1)")
        if not (0 <= self.warmup_frac and 0 <= self.cooldown_frac and self.warmup_frac + self.cooldown_frac < 1):
            raise UserError("--warmup-frac and --cooldown-frac must be >= 0 and sum to less than 1")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise UserError(f"--distill-alpha {self.distill_alpha} is outside [0, 1]")
        if self.distill_temp <= 0:
            raise UserError("--distill-temp must be positive")
        if self.head_chunk < 1:
            raise UserError("--head-chunk must be at least 1")
        if not 0.0 < self.min_keep <= 1.0:
            raise UserError(f"--min-keep {self.min_keep} is outside (0, 1]")
        if self.allocation == "global" and self.uniform:
            raise UserError("--uniform keeps every layer alike; it conflicts with --allocation global")
        if self.base_quant != "none":
            if self.criterion == "taylor":
                raise UserError("--criterion taylor needs gradients of the base weights, which a quantized base "
                                f"(--base-quant {self.base_quant}) cannot have; use lora, mask-taylor or activation")
            if self.pattern != "structured":
                raise UserError(f"--pattern {self.pattern} masks the float weight itself; it needs --base-quant none")
        if self.save_quant != "none" and not self.export:
            raise UserError("--save-quant quantizes the exported model; it needs the export (drop --no-export)")
        if self.save_quant == "nf4" and self.ratio and "ffn" in self.target_list and self.round_to % 64:
            raise UserError("--save-quant nf4 needs kept FFN widths that are multiples of 64 (bitsandbytes' "
                            "AVX512-BF16 CPU kernel fails on others, see core/quant.py); add --round-to 64")
        if self.save_quant != "none" and self.pattern != "structured":
            raise UserError(f"--save-quant would re-round the exact zeros of --pattern {self.pattern}; save it in float")
        if not self.eval_list:
            raise UserError("--eval-data needs at least one text (e.g. sotu-heldout,ptb)")
        crits = ELEMENT_CRITERIA if self.pattern != "structured" else CRITERIA
        for name, allowed in (("criterion", crits), ("importance", IMPORTANCE),
                              ("lora_projections", LORA_PROJECTIONS), ("schedule", SCHEDULES),
                              ("allocation", ALLOCATIONS), ("base_quant", QUANTS), ("save_quant", QUANTS),
                              ("dtype", DTYPE_CHOICES), ("save_dtype", SAVE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown --{name.replace('_', '-')} {getattr(self, name)!r}; "
                                f"choose one of {', '.join(allowed)}")
        bad = [t for t in self.target_list if t not in TARGETS]
        if bad or not self.target_list:
            raise UserError(f"--targets {self.targets!r}: use heads, ffn or heads,ffn")
        if self.uniform and self.skip_layers not in ("none", ""):
            raise UserError("--uniform prunes every layer alike; it conflicts with --skip-layers "
                            f"{self.skip_layers!r} (drop one of them)")

    def _resolve_pattern(self) -> None:
        """--pattern / --sparsity / --ratio defaults and combinations (see docs/sparsity.md)."""
        from .patterns import parse_pattern

        given = self.sparsity
        if not isinstance(self.pattern, str):  # YAML 1.1 reads an unquoted 2:4 as the number 124
            raise UserError(f"--pattern {self.pattern!r} must be text; quote it in config files: pattern: \"2:4\"")
        if self.pattern.strip().lower() == "structured":
            self.pattern = "structured"
            if given not in (None, 0, 0.0):
                raise UserError("--sparsity applies to --pattern unstructured (or N:M); "
                                "structured pruning uses --ratio")
            self.sparsity = 0.0
            self.ratio = 0.2 if self.ratio is None else self.ratio
            return
        p = parse_pattern(self.pattern, 0.5 if given is None else given)
        self.pattern = p.text
        if p.kind == "nm" and given is not None and abs(given - p.sparsity) > 1e-12:
            raise UserError(f"--pattern {p.text} means sparsity {p.sparsity:g}; drop --sparsity {given}")
        self.sparsity = p.sparsity
        self.ratio = 0.0 if self.ratio is None else self.ratio
        if self.lora_dropout:
            raise UserError("element patterns need --lora-dropout 0 (the masked LoRA path must equal the "
                            "merged weight)")
        if p.kind == "nm" and self.ratio > 0 and self.round_to % p.m:
            # kept FFN channels become the input columns of down_proj: N:M blocks need a multiple of M
            self.round_to = self.round_to * p.m // math.gcd(self.round_to, p.m)

    @property
    def unit_criterion(self) -> str:
        """The criterion that scores units. For an element pattern it is the element criterion's
        structured form (criteria/element.py, `unit_criterion`): wanda scores units with the
        activation criterion (|W|·||X|| summed over each unit); the report records which ran."""
        return UNIT_FORM.get(self.criterion, self.criterion) if self.pattern != "structured" else self.criterion

    @property
    def eval_list(self) -> list[str]:
        return [t.strip() for t in self.eval_data.split(",") if t.strip()]

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str) -> "PruneConfig":
        return cls.from_dict(load_config_file(path))


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise UserError(f"cannot parse config file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    return data
