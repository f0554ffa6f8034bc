"""The conversion tools as a user runs them: round trips, sharded files, the verify tool, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MODEL_CASES, run_module


def _all_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("case", [c[0] for c in MODEL_CASES])
def test_hf_megatron_hf_round_trip_is_bit_identical(case, converted_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, ckpt = converted_models[case]
    meta = json.loads((ckpt / "scope_megatron.json").read_text())
    assert meta["arch"]["model_type"] == case.split("_")[0] and meta["dtype"] == "float32"
    assert (ckpt / "hf" / "tokenizer.json").is_file() and (ckpt / "model" / "metadata.json").is_file()

    out = tmp_path / "exported"
    proc = run_module("checkpoints_tools.megatron_to_hf", "--ckpt", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["files"] == ["model.safetensors"]
    original, exported = _all_tensors(hf_dir), _all_tensors(out)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    # transformers loads it, tokenizer included, and computes the same logits
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(out)("1+1=\\boxed{2}", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_bf16_sharded_checkpoint_round_trip(tmp_path):
    """bf16 weights in a sharded safetensors index in, bf16 shards + index out, bit for bit."""
    from transformers import AutoModelForCausalLM

    from scope_megatron.examples.tiny_models import make_tiny_tokenizer, tiny_hf_config

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen2")).to(torch.bfloat16)
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="60KB")
    make_tiny_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = run_module("checkpoints_tools.hf_to_megatron", "--hf", str(src), "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["dtype"] == "bfloat16"
    proc = run_module("checkpoints_tools.megatron_to_hf", "--ckpt", str(ckpt), "--out", str(out),
                      "--max-shard-gb", str(60e3 / 1024**3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, exported = _all_tensors(src), _all_tensors(out)
    assert sorted(original) == sorted(exported)
    assert all(exported[n].dtype == torch.bfloat16 and torch.equal(exported[n], t) for n, t in original.items())


def test_verify_tool_passes_at_tp2_and_fails_on_a_wrong_checkpoint(converted_models):
    hf_dir, ckpt = converted_models["qwen3"]
    proc = run_module("checkpoints_tools.verify", "--hf", str(hf_dir), "--ckpt", str(ckpt), "--tp", "2",
                      "--lengths", "5,40", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["tp"] == 2 and result["max_abs_logit_diff"] < 1e-4
    assert result["argmax_agreement"] == 1.0
    # the qwen3_tied checkpoint holds other weights: verify must notice and exit non-zero
    other_hf, _ = converted_models["qwen3_tied"]
    proc = run_module("checkpoints_tools.verify", "--hf", str(other_hf), "--ckpt", str(ckpt), "--lengths", "5")
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["ok"] and result["max_abs_logit_diff"] > 1e-2


def _copy_model(converted_models, tmp_path, case="llama") -> Path:
    src = tmp_path / "hf"
    shutil.copytree(converted_models[case][0], src)
    return src


def _expect_input_error(tmp_path, pattern: str, *args: str) -> None:
    out = tmp_path / "out"
    proc = run_module("checkpoints_tools.hf_to_megatron", *args, "--out", str(out))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert pattern in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_missing_weight_file(converted_models, tmp_path):
    src = _copy_model(converted_models, tmp_path)
    (src / "model.safetensors").unlink()
    _expect_input_error(tmp_path, "no model.safetensors", "--hf", str(src))


def test_missing_shard_listed_in_index(tmp_path):
    from transformers import AutoModelForCausalLM

    from scope_megatron.examples.tiny_models import tiny_hf_config

    src = tmp_path / "hf"
    AutoModelForCausalLM.from_config(tiny_hf_config("llama")).save_pretrained(src, max_shard_size="60KB")
    victim = sorted(src.glob("model-*.safetensors"))[-1]
    victim.unlink()
    _expect_input_error(tmp_path, f"{victim.name} listed in model.safetensors.index.json is missing", "--hf", str(src))


def test_truncated_weight_file(converted_models, tmp_path):
    src = _copy_model(converted_models, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_input_error(tmp_path, "model.safetensors", "--hf", str(src))


def test_tensor_with_wrong_shape(converted_models, tmp_path):
    from safetensors.torch import save_file

    src = _copy_model(converted_models, tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 100)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    _expect_input_error(tmp_path, "'model.layers.1.mlp.down_proj.weight' has shape (64, 100), expected (64, 128)",
                        "--hf", str(src))


def test_missing_tensor(converted_models, tmp_path):
    from safetensors.torch import save_file

    src = _copy_model(converted_models, tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    _expect_input_error(tmp_path, "'model.layers.0.self_attn.k_proj.weight' is missing", "--hf", str(src))


def test_unsupported_config(converted_models, tmp_path):
    src = _copy_model(converted_models, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    _expect_input_error(tmp_path, "'rope_scaling': rope type 'yarn' is not implemented", "--hf", str(src))


def test_existing_output_is_refused_and_untouched(converted_models, tmp_path):
    hf_dir, _ = converted_models["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_module("checkpoints_tools.hf_to_megatron", "--hf", str(hf_dir), "--out", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_conversion_split_over_torchrun_ranks(converted_models, tmp_path):
    """hf_to_megatron --tp 2 under torchrun writes the same checkpoint content as one process."""
    hf_dir, _ = converted_models["qwen2"]
    ckpt, out = tmp_path / "ckpt_tp2", tmp_path / "out"
    proc = run_module("checkpoints_tools.hf_to_megatron", "--hf", str(hf_dir), "--out", str(ckpt), "--tp", "2", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_module("checkpoints_tools.megatron_to_hf", "--ckpt", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, exported = _all_tensors(hf_dir), _all_tensors(out)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(exported[n], t) for n, t in original.items())
