"""The post-sync probe check (trainer.weight_sync) through the real weight-sync path: a megatron
trainer rank on gloo, embedded student engines in fp32 and in bf16, a tiny model.

The tiny models' output layer is scaled up so that they are confident like trained models (the
greedy tokens have log-probs near 0); a random tiny model is near-uniform, where no probe tells
noise from a wrong mapping.

- The probe is the engine's greedy continuation of the prompt: it equals plain transformers'
  greedy decoding of the trainer's weights (the independent reference).
- A wrong update (layer 1's norms, o_proj and down_proj under a misspelt name, which SGLang, and
  the embedded engine with it, only logs and reports as success) fails the check in fp32, and in bf16 its statistic is
  far above the bf16 tolerance, while a correct sync into a bf16 engine (bf16 weights and bf16
  compute against the fp32 trainer) stays well below it.
"""

from __future__ import annotations

import json

import pytest
import torch

from scope_megatron.rollout.embedded_server import start_embedded_server
from scope_megatron.examples.tiny_models import make_tiny_tokenizer, save_tiny_hf_model
from scope_megatron.trainer.weight_sync import default_verify_tolerance
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.timeout(300)
PROBE_TOKENS = 16
LOGIT_SCALE = 30.0


def confident_tiny_model(path, seed: int):
    """A tiny qwen3 whose lm_head is scaled by LOGIT_SCALE (peaked next-token distributions)."""
    from safetensors.torch import load_file, save_file

    out = save_tiny_hf_model(path, seed=seed)
    state = load_file(str(out / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"] * LOGIT_SCALE
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


STACKED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # fused by the engine's load_weights


def misspelt_layer_1(stream):
    """The export with layer 1's unfused tensors (norms, o_proj, down_proj) under a name the model
    lacks (model.layer.1 for model.layers.1). SGLang's load_weights only logs such a name
    (srt/models/qwen3.py: "Parameter X not found in params_dict") and the update succeeds; a
    misspelt fused name would fail the update instead (params_dict[name] raises)."""
    for name, tensor in stream:
        if name.startswith("model.layers.1.") and not any(part in name for part in STACKED):
            name = name.replace("model.layers.1.", "model.layer.1.")
        yield name, tensor


def _trainer(rank: int, world: int, trainer_dir: str, urls: dict, prompt_ids: list, out_dir: str) -> dict:
    from pathlib import Path

    import torch.distributed as dist

    import scope_megatron.model.hf_io as hf_io
    from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.parallel import init_parallel
    from scope_megatron.examples.tiny_models import make_tiny_tokenizer
    from scope_megatron.trainer.weight_sync import SyncError, WeightSync, make_probe

    init_parallel(1, 1)
    arch = arch_from_hf_config(load_hf_config(trainer_dir))
    model = build_gpt_model(arch, params_dtype=torch.float32, perform_initialization=False)
    reader = hf_io.HFWeightReader(trainer_dir, arch)
    hf_io.load_hf_into_model(model, arch, reader)
    group = dist.new_group(backend="gloo")
    probe = make_probe(prompt_ids, "2", make_tiny_tokenizer(), PROBE_TOKENS)
    real_export = hf_io.export_hf_tensors_to_rank0  # what WeightSync.sync streams
    results: dict = {}

    def sync(url: str, tolerance: float, broken: bool, log: str):
        sync_ = WeightSync(model=model, ddp_model=model, arch=arch, control_group=group, engine_urls=[url],
                           transport="distributed", bucket_bytes=1 << 20, disk_dir=Path(out_dir) / "disk",
                           master_address="127.0.0.1", flattened_bucket=False, timeout_s=120, verify=True,
                           tolerance=tolerance, probe=probe, api_key=None, log_path=Path(out_dir) / log,
                           device=torch.device("cpu"))
        hf_io.export_hf_tensors_to_rank0 = (lambda m, a: misspelt_layer_1(real_export(m, a))) if broken else real_export
        try:
            result = sync_.sync(step=1)
            return {"ok": True, "mean": result.probe_mean_abs_diff, "max": result.probe_max_abs_diff}
        except SyncError as exc:
            return {"ok": False, "error": str(exc)}
        finally:
            hf_io.export_hf_tensors_to_rank0 = real_export
            sync_.close()

    # each engine starts from other weights; the broken sync first (it leaves layer 1 as it was)
    fp32 = default_verify_tolerance(torch.float32)
    results["fp32_broken"] = sync(urls["fp32"], fp32, True, "fp32.jsonl")
    results["fp32_ok"] = sync(urls["fp32"], fp32, False, "fp32.jsonl")
    results["bf16_broken"] = sync(urls["bf16"], float("inf"), True, "bf16.jsonl")
    results["bf16_ok"] = sync(urls["bf16"], float("inf"), False, "bf16.jsonl")
    return results


def hf_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_probe_is_the_greedy_continuation_and_catches_a_wrong_update_in_fp32_and_bf16(tmp_path):
    engine_dir = confident_tiny_model(tmp_path / "engine_start", seed=1)
    trainer_dir = confident_tiny_model(tmp_path / "trainer", seed=2)
    tokenizer = make_tiny_tokenizer()
    prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": "What is 1+1?"}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False))
    with start_embedded_server(engine_dir) as fp32_engine, \
            start_embedded_server(engine_dir, dtype="bfloat16") as bf16_engine:
        res = run_ranks(_trainer, world_size=1, args=(str(trainer_dir), {"fp32": fp32_engine.url,
                                                                          "bf16": bf16_engine.url},
                                                      prompt_ids, str(tmp_path)), timeout=240)[0]
    fp32_tol, bf16_tol = default_verify_tolerance(torch.float32), default_verify_tolerance(torch.bfloat16)
    print({case: {k: v for k, v in r.items() if k != "error"} for case, r in res.items()})
    # fp32: the wrong update is refused, the right one passes with fp32 rounding differences only
    assert not res["fp32_broken"]["ok"], res
    assert "mean |delta log p|" in res["fp32_broken"]["error"] and fp32_engine.url in res["fp32_broken"]["error"]
    assert res["fp32_ok"]["ok"] and res["fp32_ok"]["mean"] < 1e-4, res
    # the probe of the good fp32 sync is transformers' greedy continuation of the trainer's weights
    records = [json.loads(line) for line in (tmp_path / "fp32.jsonl").read_text().splitlines()]
    good = records[-1]
    assert good["response_ids"] == hf_greedy(trainer_dir, prompt_ids, PROBE_TOKENS)
    assert good["prompt_ids"] == prompt_ids and good["tolerance"] == fp32_tol
    assert good["mean_abs_diff"] == pytest.approx(res["fp32_ok"]["mean"])
    assert sum(good["trainer_logprobs"]) / PROBE_TOKENS > -1.0  # confident tokens, as intended
    # bf16 engine (weights and compute) vs the fp32 trainer: noise well under the bf16 tolerance,
    # the wrong update many times over it
    assert res["bf16_ok"]["ok"] and res["bf16_broken"]["ok"], res  # tolerance inf: statistics only
    assert res["bf16_ok"]["mean"] < bf16_tol / 3, res
    assert res["bf16_ok"]["mean"] > 1e-4, res  # the bf16 engine really rounded
    assert res["bf16_broken"]["mean"] > 5 * bf16_tol, res
