"""Tiny HF models and a tiny tokenizer, built locally (no hub access), for tests, demo and benches.

- :func:`tiny_hf_config` gives a transformers config of a supported family at toy size.
- :func:`make_tiny_tokenizer` builds a character-level fast tokenizer with a Qwen-style chat
  template, so prompts, chat formatting and ``\\boxed{}`` answers work end to end.
- :func:`save_tiny_hf_model` writes a random model (+ tokenizer) to a directory the way
  ``save_pretrained`` does, which is what users hand to the conversion tools.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

# Special tokens of the tiny tokenizer (ids 0..len-1), Qwen-style names.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Characters the tiny tokenizer knows: printable ASCII (digits, letters, punctuation, space, \n).
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_vocab_size() -> int:
    """Number of tokens of the tiny tokenizer."""
    return len(SPECIAL_TOKENS) + len(CHARS)


def make_tiny_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with a chat template; eos = ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_hf_config(family: str = "qwen3", **overrides: Any):
    """A transformers config of ``family`` ("llama", "qwen2", "qwen3") at toy size.

    Defaults: 2 layers, hidden 64, 4 query heads, 2 KV heads (GQA), ffn 128, the tiny
    tokenizer's vocabulary (padded by Megatron to 128 x TP), untied embeddings.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=tiny_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
    )
    if family == "llama":
        cls, extra = LlamaConfig, dict(rope_theta=500000.0, rms_norm_eps=1e-5, attention_bias=False)
    elif family == "qwen2":
        cls, extra = Qwen2Config, dict(rope_theta=1000000.0, use_sliding_window=False)
    elif family == "qwen3":
        cls, extra = Qwen3Config, dict(rope_theta=1000000.0, head_dim=32, use_sliding_window=False)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {FAMILIES}")
    kwargs = {**common, **extra, **overrides}
    return cls(**kwargs)


def save_tiny_hf_model(out_dir: str | Path, family: str = "qwen3", seed: int = 0, with_tokenizer: bool = True,
                       dtype: str = "float32", **overrides: Any) -> Path:
    """Write a random tiny model of ``family`` (and the tiny tokenizer) to ``out_dir``; return it."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # HF initialises norms to 1; randomise them so a mapping mistake on a norm shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    if with_tokenizer:
        make_tiny_tokenizer().save_pretrained(out)
    return out
