"""Shared fixtures: tiny seeded LLaMA/Mistral/Qwen2 models and a tiny local tokenizer.

The suite must not depend on the machine it runs on: no network (the hub is off for this process
and every subprocess it starts), no user caches (the converted embedded model, the zero-shot data
and the datasets/hub caches live in a fresh directory per session, removed at the end), one torch
thread, and no `LORAPRUNE_FAULTS` unless a test sets it.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

torch.set_num_threads(1)
_SESSION_CACHE = tempfile.mkdtemp(prefix="loraprune-test-cache-")
os.environ.update({
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "LORAPRUNE_CACHE": os.path.join(_SESSION_CACHE, "loraprune"), "HF_HOME": os.path.join(_SESSION_CACHE, "hf"),
})
os.environ.pop("LORAPRUNE_FAULTS", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

SAMPLE = ("Fellow citizens of the Senate and House of Representatives. The state of the union is strong. "
          "We met to consider the public good, the common defence and the general welfare of the nation. ")


def tiny_config(family: str = "llama", heads: int = 8, kv: int = 4, hidden: int = 64, inter: int = 96,
                layers: int = 2, vocab: int = 320):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
              head_dim=hidden // heads, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    return cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    # Random init is tiny (std 0.02); widen it so units differ measurably.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained here on a few sentences (vocab 320), saved as a HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return fast


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny GQA LLaMA with tokenizer (loads with from_pretrained)."""
    def make(family="llama", **kw):
        d = tmp_path / f"tiny-{family}"
        m = tiny_model(family, vocab=len(tiny_tokenizer), **kw)
        m.save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        return d
    return make


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text(SAMPLE * 60)
    return p
