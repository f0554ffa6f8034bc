"""HF config validation, vocab padding and the HF <-> Megatron layout rules, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from scope_megatron.model.arch import UnsupportedModelError, arch_from_hf_config, check_parallel_layout
from scope_megatron.model.builder import padded_vocab_size
from scope_megatron.model.mapping import (expected_hf_shapes, global_to_hf, hf_to_global, merge_shards,
                                          param_maps, shard)
from scope_megatron.examples.tiny_models import tiny_hf_config


def _cfg(family: str, **overrides) -> dict:
    return tiny_hf_config(family, **overrides).to_dict()


def test_families_map_to_the_right_features():
    llama, qwen2, qwen3 = (arch_from_hf_config(_cfg(f)) for f in ("llama", "qwen2", "qwen3"))
    assert (llama.qkv_bias, llama.qk_layernorm, llama.rms_norm_eps, llama.rope_theta) == (False, False, 1e-5, 5e5)
    assert (qwen2.qkv_bias, qwen2.qk_layernorm) == (True, False)
    assert (qwen3.qkv_bias, qwen3.qk_layernorm, qwen3.head_dim) == (False, True, 32)
    assert qwen3.num_query_groups == 2 and qwen3.num_attention_heads == 4


def test_classic_config_json_layout_is_read():
    # What Qwen3-0.6B's config.json on the hub says (transformers 4 layout: rope_theta at top level).
    cfg = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
           "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16", "max_position_embeddings": 40960, "hidden_act": "silu",
           "use_sliding_window": False, "sliding_window": None, "attention_bias": False}
    arch = arch_from_hf_config(cfg)
    assert arch.head_dim == 128 and arch.tie_word_embeddings and arch.torch_dtype == "bfloat16"
    assert 595e6 < arch.num_parameters < 597e6  # Qwen3-0.6B: 596M parameters


def test_llama3_rope_scaling_accepted_and_others_refused():
    cfg = _cfg("llama")
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}
    assert arch_from_hf_config(cfg).llama3_rope_factor == 32.0
    cfg["rope_scaling"]["high_freq_factor"] = 2.0
    with pytest.raises(UnsupportedModelError, match="rope_scaling.high_freq_factor"):
        arch_from_hf_config(cfg)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedModelError, match="'rope_scaling'.*yarn"):
        arch_from_hf_config(cfg)


@pytest.mark.parametrize("field,value,pattern", [
    ("model_type", "mistral", "'model_type'.*mistral"),
    ("use_sliding_window", True, "'use_sliding_window'"),
    ("num_experts", 8, "'num_experts'.*mixture"),
    ("hidden_act", "gelu", "'hidden_act'"),
    ("num_key_value_heads", 3, "'num_key_value_heads'"),
    ("hidden_size", 0, "'hidden_size'"),
])
def test_unsupported_configs_name_the_field(field, value, pattern):
    cfg = _cfg("qwen3")
    cfg[field] = value
    with pytest.raises(UnsupportedModelError, match=pattern) as info:
        arch_from_hf_config(cfg)
    assert info.value.field == field


def test_parallel_layout_constraints():
    arch = arch_from_hf_config(_cfg("qwen3"))
    check_parallel_layout(arch, 4, 2)  # TP 4 > 2 KV heads is allowed (TP % groups == 0)
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_parallel_layout(arch, 8, 1)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        check_parallel_layout(arch, 1, 3)


@pytest.mark.parametrize("vocab,tp,expected", [(151936, 1, 151936), (151936, 2, 152064), (151936, 4, 152064),
                                               (151936, 8, 152576), (128256, 8, 129024), (99, 1, 128), (99, 2, 256)])
def test_padded_vocab_matches_megatron_lm(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected


def test_qkv_fusion_is_grouped_per_kv_head():
    # 4 query heads, 2 KV groups, head_dim 1, hidden 1: label every row by where it came from.
    arch = arch_from_hf_config(_cfg("qwen3", hidden_size=4, head_dim=1, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=4))
    q = torch.tensor([[10.], [11.], [12.], [13.]])
    k = torch.tensor([[20.], [21.]])
    v = torch.tensor([[30.], [31.]])
    pm = next(p for p in param_maps(arch) if p.megatron_name.endswith("layers.0.self_attention.linear_qkv.weight"))
    fused = hf_to_global(arch, pm, [q, k, v])
    # group 0: q heads 0,1, k0, v0; group 1: q heads 2,3, k1, v1
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert [t.flatten().tolist() for t in global_to_hf(arch, pm, fused)] == [[10, 11, 12, 13], [20, 21], [30, 31]]
    # TP=2 gives each rank one whole group
    assert shard(pm, fused, 1, 2, 0).flatten().tolist() == [12, 13, 21, 31]


def test_fc1_shards_hold_gate_and_up_halves():
    arch = arch_from_hf_config(_cfg("llama"))
    pm = next(p for p in param_maps(arch) if p.kind == "fc1")
    gate, up = torch.arange(4.).reshape(4, 1), torch.arange(10., 14.).reshape(4, 1)
    full = hf_to_global(arch, pm, [gate, up])
    assert shard(pm, full, 0, 2, 0).flatten().tolist() == [0, 1, 10, 11]
    assert shard(pm, full, 1, 2, 0).flatten().tolist() == [2, 3, 12, 13]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_then_merge_is_identity_for_every_parameter(family, tp):
    arch = arch_from_hf_config(_cfg(family))
    shapes = expected_hf_shapes(arch)
    padded = padded_vocab_size(arch.vocab_size, tp)
    gen = torch.Generator().manual_seed(0)
    for pm in param_maps(arch):
        hf = [torch.randn(shapes[n], generator=gen) for n in pm.hf_names]
        full = hf_to_global(arch, pm, hf)
        shards = [shard(pm, full, r, tp, padded) for r in range(tp)]
        if pm.kind == "vocab":
            assert sum(s.shape[0] for s in shards) == padded
            assert torch.all(torch.cat(shards)[arch.vocab_size:] == 0)  # padding rows are zeros
        back = global_to_hf(arch, pm, merge_shards(pm, shards, arch.vocab_size))
        for a, b in zip(hf, back):
            assert torch.equal(a, b), pm.megatron_name
