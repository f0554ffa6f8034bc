"""GRPO's KL to the initial policy (``algorithm.grpo_kl_beta``) through the whole loop (CPU, one rank).

The trainer's frozen reference model must hold the initial student's weights for the whole run.
Reference computed here with plain transformers: on step 2's saved rollouts, the k3 KL between
the weights that train at step 2 (the HF export of step 1) and the initial student, both at the
rollout temperature (``scale_logits_by_rollout_temperature``), averaged over response tokens,
equals the step's ``grpo/k3_ref_kl``. At step 1 the two policies are the same weights: k3 is 0.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.loop_utils import asset_overrides, read_metrics, run_train, tail

pytestmark = pytest.mark.timeout(420)
TEMPERATURE = 0.6  # configs/tiny_cpu.yaml's rollout temperature


def _logprobs(model, trajectory) -> list[float]:
    prompt, response = trajectory["prompt_ids"], trajectory["response_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    p = len(prompt)
    return [logp[p - 1 + j, t].item() for j, t in enumerate(response)]


def test_reference_kl_is_to_the_initial_student(tmp_path):
    from transformers import AutoModelForCausalLM

    from scope_megatron.examples.tiny import prepare

    assets = prepare(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    proc = run_train(*asset_overrides(assets, run_dir), "steps=2", "algorithm.preset=grpo",
                     "algorithm.grpo_kl_beta=0.5", "logging.save_rollouts=true", "checkpoint.export_hf_steps=[1]",
                     "checkpoint.every=0", "checkpoint.save_at_end=false", "optimizer.lr=1e-2", "rollout.group_size=4",
                     "rollout.prompts_per_step=4", timeout=360)
    assert proc.returncode == 0, tail(proc)
    assert "reference model for algorithm.grpo_kl_beta=0.5" in proc.stderr
    metrics = read_metrics(run_dir)
    assert abs(metrics[1]["grpo/k3_ref_kl"]) < 1e-6 and metrics[1]["time/ref_logprobs"] > 0
    assert metrics[1]["train/grad_norm"] > 0  # some group had both outcomes: step 1 moved the policy
    initial = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float32).eval()
    after_step1 = AutoModelForCausalLM.from_pretrained(run_dir / "hf" / "step_00000001", dtype=torch.float32).eval()
    rollouts = [json.loads(line) for line in (run_dir / "rollouts" / "step_00000002.jsonl").read_text().splitlines()]
    total, count = 0.0, 0
    for t in rollouts:
        for lp_ref, lp in zip(_logprobs(initial, t), _logprobs(after_step1, t)):
            d = lp_ref - lp
            total += math.expm1(d) - d
            count += 1
    expected = total / count
    assert expected > 1e-5  # the step-1 update moved the policy: the check is not vacuous
    assert metrics[2]["grpo/k3_ref_kl"] == pytest.approx(expected, rel=1e-3)
