"""HF <-> megatron-core parameter names and layouts: the one mapping used by conversion and weight sync.

Layout rules (verified against HF logits; ``docs/megatron-notes.md`` §2):
- QKV is fused per query group: rows ``[q heads of group g; k_g; v_g]`` for g = 0..G-1, then
  split evenly on dim 0 across TP (also when TP > G).
- fc1 is ``[gate; up]`` globally, but TP rank r holds ``[gate_r; up_r]``.
- column-parallel weights (QKV, fc1, embedding, output layer) split dim 0; row-parallel
  (attention output, fc2) split dim 1; norms are replicated.
- embedding / output rows are padded with zeros to the padded vocabulary; export strips them.
- global layer index = pipeline-stage offset + local index.

Names below are the local layer spec's; Transformer Engine names (norms fused into the next
linear) are translated by :func:`canonical_name`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from .arch import ModelArch

Kind = Literal["vocab", "qkv", "fc1", "column", "row", "replicated"]

# TE spec fuses the pre-attention / pre-MLP RMSNorm into the next linear layer.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class ParamMap:
    """One megatron parameter (global layer index) and the HF tensors it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: Kind
    layer: int | None  # global layer index; None for embedding / final norm / output layer


def canonical_name(name: str) -> str:
    """Local-spec name of a megatron parameter (TE fused-norm names translated)."""
    for te_name, local_name in _TE_ALIASES.items():
        if name.endswith(te_name):
            return name[: -len(te_name)] + local_name
    return name


def param_maps(arch: ModelArch, include_output_layer: bool | None = None) -> list[ParamMap]:
    """Every megatron parameter of the whole model, in HF order.

    ``include_output_layer`` defaults to ``not tie_word_embeddings`` (a tied model without PP
    has no output layer; with PP the last stage's copy maps to the embedding, see
    :func:`local_param_map`).
    """
    if include_output_layer is None:
        include_output_layer = not arch.tie_word_embeddings
    maps = [ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", None)]
    for i in range(arch.num_layers):
        mp, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        att = hf + "self_attn."
        maps.append(ParamMap(mp + "input_layernorm.weight", (hf + "input_layernorm.weight",), "replicated", i))
        maps.append(ParamMap(mp + "self_attention.linear_qkv.weight",
                             (att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight"), "qkv", i))
        if arch.qkv_bias:
            maps.append(ParamMap(mp + "self_attention.linear_qkv.bias",
                                 (att + "q_proj.bias", att + "k_proj.bias", att + "v_proj.bias"), "qkv", i))
        if arch.qk_layernorm:
            maps.append(ParamMap(mp + "self_attention.q_layernorm.weight", (att + "q_norm.weight",), "replicated", i))
            maps.append(ParamMap(mp + "self_attention.k_layernorm.weight", (att + "k_norm.weight",), "replicated", i))
        maps.append(ParamMap(mp + "self_attention.linear_proj.weight", (att + "o_proj.weight",), "row", i))
        maps.append(ParamMap(mp + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",),
                             "replicated", i))
        maps.append(ParamMap(mp + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                             "fc1", i))
        maps.append(ParamMap(mp + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), "row", i))
    maps.append(ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated", None))
    if include_output_layer:
        maps.append(ParamMap("output_layer.weight", ("lm_head.weight",), "vocab", None))
    return maps


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def local_param_map(arch: ModelArch, local_name: str, layer_offset: int) -> ParamMap:
    """The :class:`ParamMap` of a parameter of one pipeline stage (local layer numbering)."""
    name = canonical_name(local_name)
    m = _LAYER_RE.match(name)
    if m:
        name = f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}"
    if name == "output_layer.weight" and arch.tie_word_embeddings:
        # last stage's own copy of a tied embedding (PP > 1)
        return ParamMap(name, ("model.embed_tokens.weight",), "vocab", None)
    for pm in param_maps(arch, include_output_layer=True):
        if pm.megatron_name == name:
            return pm
    raise KeyError(f"megatron parameter {local_name!r} has no HF counterpart for {arch.model_type}")


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the model needs (lm_head only when untied)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if arch.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if arch.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


# ----------------------------------------------------------------------------------------------
# HF tensors <-> the global (unsharded, unpadded) megatron tensor


def hf_to_global(arch: ModelArch, pm: ParamMap, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
    """Build the global megatron tensor of ``pm`` from its HF tensors (in ``pm.hf_names`` order)."""
    if pm.kind == "qkv":
        q, k, v = hf_tensors
        groups, d = arch.num_query_groups, arch.head_dim
        per_group = arch.num_attention_heads // groups * d
        tail = q.shape[1:]
        fused = torch.cat([q.reshape(groups, per_group, *tail), k.reshape(groups, d, *tail),
                           v.reshape(groups, d, *tail)], dim=1)
        return fused.reshape(-1, *tail)
    if pm.kind == "fc1":
        return torch.cat(hf_tensors, dim=0)
    (tensor,) = hf_tensors
    return tensor


def global_to_hf(arch: ModelArch, pm: ParamMap, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`hf_to_global` (the vocab padding must already be stripped)."""
    if pm.kind == "qkv":
        groups, d = arch.num_query_groups, arch.head_dim
        per_group = arch.num_attention_heads // groups * d
        tail = tensor.shape[1:]
        grouped = tensor.reshape(groups, per_group + 2 * d, *tail)
        q, k, v = grouped.split([per_group, d, d], dim=1)
        return [q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous()]
    if pm.kind == "fc1":
        return [t.contiguous() for t in tensor.chunk(2, dim=0)]
    return [tensor]


# ----------------------------------------------------------------------------------------------
# global tensor <-> tensor-parallel shards


def shard(pm: ParamMap, tensor: torch.Tensor, tp_rank: int, tp: int, padded_vocab: int) -> torch.Tensor:
    """This TP rank's shard of a global megatron tensor (vocab rows zero-padded first)."""
    if pm.kind == "vocab":
        if tensor.shape[0] < padded_vocab:
            pad = tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, pad], dim=0)
        return tensor.chunk(tp, dim=0)[tp_rank]
    if pm.kind in ("qkv", "column"):
        return tensor.chunk(tp, dim=0)[tp_rank]
    if pm.kind == "fc1":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    if pm.kind == "row":
        return tensor.chunk(tp, dim=1)[tp_rank]
    return tensor


def merge_shards(pm: ParamMap, shards: list[torch.Tensor], true_vocab: int) -> torch.Tensor:
    """Inverse of :func:`shard` over all TP ranks (vocab padding stripped)."""
    if pm.kind == "vocab":
        return torch.cat(shards, dim=0)[:true_vocab]
    if pm.kind in ("qkv", "column"):
        return torch.cat(shards, dim=0)
    if pm.kind == "fc1":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if pm.kind == "row":
        return torch.cat(shards, dim=1)
    return shards[0]
