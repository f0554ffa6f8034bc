"""What the student's architecture is, read from a Hugging Face ``config.json`` and validated.

Supported: dense Llama-2 / Llama-3 (incl. Llama-3.1/3.2 "llama3" rope scaling), Qwen2 / Qwen2.5
(QKV bias) and Qwen3 (q/k RMSNorm). Anything else the builder does not implement (other rope
scaling types, sliding window, MoE, unknown model_type, biases it has no slot for) raises
:class:`UnsupportedModelError` naming the config field, before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# megatron-core's llama3 rope scaling hard-codes these (rotary_pos_embedding._apply_scaling).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class UnsupportedModelError(ValueError):
    """The HF config asks for something the Megatron builder does not implement."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.json field {field!r}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelArch:
    """A supported decoder-only architecture, in HF terms, independent of parallelism."""

    model_type: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int  # true vocabulary (HF embedding rows); Megatron pads beyond it
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # KV heads
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    llama3_rope_factor: float | None  # set for Llama-3.1/3.2 "llama3" rope scaling
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    max_position_embeddings: int
    torch_dtype: str  # dtype the checkpoint stores ("float32", "bfloat16", "float16")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def num_parameters(self) -> int:
        """Parameter count of the HF model (true vocab; the tied head counted once)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * d if self.qk_layernorm else 0)
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


def _rope(cfg: dict[str, Any]) -> tuple[float, float | None]:
    """(rope_theta, llama3 factor or None) from either the classic or the transformers-5 layout."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        theta = 10000.0
    rope_type = None
    source_field = "rope_scaling"
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
    elif params and params.get("rope_type", "default") != "default":
        scaling, rope_type, source_field = params, params.get("rope_type"), "rope_parameters"
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            source_field, f"rope type {rope_type!r} is not implemented (supported: default, llama3)")
    for key, expected in _LLAMA3_FIXED.items():
        if float(scaling.get(key, expected)) != expected:
            raise UnsupportedModelError(
                f"{source_field}.{key}",
                f"{scaling.get(key)} is not supported; megatron-core's llama3 scaling fixes it to {expected}")
    if "factor" not in scaling:
        raise UnsupportedModelError(f"{source_field}.factor", "llama3 rope scaling needs a factor")
    return float(theta), float(scaling["factor"])


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """Validate an HF config dict and return its :class:`ModelArch` (or raise naming the field)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            "model_type", f"{model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            raise UnsupportedModelError(key, "mixture-of-experts models are not supported")
    if cfg.get("use_sliding_window") or (cfg.get("sliding_window") and model_type == "llama"):
        raise UnsupportedModelError("use_sliding_window", "sliding-window attention is not supported")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError("layer_types", "only full attention layers are supported")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias", "MLP biases are not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError("hidden_act", f"{act!r} is not supported (SwiGLU with silu only)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise UnsupportedModelError(key, f"must be a positive integer, got {cfg.get(key)!r}")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise UnsupportedModelError("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if model_type == "qwen2":
        qkv_bias = True
    elif model_type == "llama":
        qkv_bias = bool(cfg.get("attention_bias", False))
    else:
        if cfg.get("attention_bias"):
            raise UnsupportedModelError("attention_bias", "Qwen3 with attention bias is not supported")
        qkv_bias = False
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor", "partial rotary embeddings are not supported")
    theta, llama3_factor = _rope(cfg)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UnsupportedModelError("torch_dtype", f"{dtype!r} is not supported")
    return ModelArch(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        llama3_rope_factor=llama3_factor,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_layernorm=model_type == "qwen3",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        torch_dtype=dtype,
    )


def load_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """Read ``hf_dir/config.json`` (a clear error when it is missing or not JSON)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def check_parallel_layout(arch: ModelArch, tp: int, pp: int) -> None:
    """Raise ValueError naming the constraint when ``arch`` cannot run at TP=tp, PP=pp."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor/pipeline parallel sizes must be >= 1 (got tp={tp}, pp={pp})")
    if arch.num_attention_heads % tp:
        raise ValueError(f"tp={tp} must divide num_attention_heads={arch.num_attention_heads}")
    if arch.num_query_groups % tp and tp % arch.num_query_groups:
        raise ValueError(f"tp={tp} and num_key_value_heads={arch.num_query_groups}: one must divide the other")
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"tp={tp} must divide intermediate_size={arch.ffn_hidden_size}")
    if arch.num_layers % pp:
        raise ValueError(f"pp={pp} must divide num_hidden_layers={arch.num_layers}")
