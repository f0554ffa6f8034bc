"""Refilling filtered groups (``algorithm.refill_filtered_groups``, DAPO's dynamic sampling), end to
end with embedded engines (CPU, one rank).

The prompts are half "uniform" (the reward below marks every sample of them wrong: a group
without signal) and half "mixed" (its samples alternate wrong / right, so every such group is
informative). With ``filter_uniform_groups`` alone a step trains on the mixed prompts it happened
to draw; with refill every step reaches ``prompts_per_step`` groups, all mixed, and the logged
counts add up: every prompt drawn is either a dropped uniform group, a trained group or a
surplus one, and the sampler advanced by exactly the prompts drawn (the checkpoint's position).
A cap of one extra round on an all-uniform dataset trains nothing and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scope_megatron.examples.tiny import PROBLEMS
from scope_megatron.trainer.checkpointing import TRAINER_STATE, list_checkpoints
from tests.loop_utils import asset_overrides, read_metrics, run_train, tail

pytestmark = pytest.mark.timeout(420)
PROMPTS_PER_STEP, GROUP_SIZE, STEPS = 3, 2, 2
_calls = [0]


def alternating_reward(text: str, gold: str, truncated: bool) -> float:
    """``uniform`` prompts: always 0. ``mixed``: 0, 1, 0, 1 ... by call. The controller scores a
    group's samples in one consecutive run of calls and every group has an even number of
    samples, so each mixed group gets both outcomes whatever the texts are."""
    _calls[0] += 1
    return 0.0 if gold == "uniform" else float(_calls[0] % 2 == 0)


def _write_prompts(path: Path, kinds: list[str]) -> Path:
    with path.open("w") as f:
        for i, kind in enumerate(kinds):
            problem = PROBLEMS[i % len(PROBLEMS)][0]
            f.write(json.dumps({"id": f"p{i}", "problem": problem, "answer": kind}) + "\n")
    return path


def _overrides(assets, run_dir, prompts, *extra) -> list[str]:
    return [*asset_overrides(assets, run_dir), f"data.paths=[{prompts}]", f"steps={STEPS}",
            f"rollout.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.group_size={GROUP_SIZE}",
            "algorithm.reward_function=tests.test_loop_refill:alternating_reward",
            "algorithm.filter_uniform_groups=true", "algorithm.refill_filtered_groups=true",
            "logging.save_rollouts=true", "checkpoint.keep_last=0", *extra]



def test_refill_reaches_the_batch_size(assets, tmp_path):
    kinds = ["uniform", "mixed"] * 6  # 12 prompts, half without signal
    prompts = _write_prompts(tmp_path / "prompts.jsonl", kinds)
    run_dir = tmp_path / "run"
    proc = run_train(*_overrides(assets, run_dir, prompts, "algorithm.refill_max_rounds=6"), timeout=360)
    assert proc.returncode == 0, tail(proc)
    metrics = read_metrics(run_dir)
    drawn_total = 0
    for step in range(1, STEPS + 1):
        m = metrics[step]
        rollouts = [json.loads(line) for line in
                    (run_dir / "rollouts" / f"step_{step:08d}.jsonl").read_text().splitlines()]
        groups = sorted({t["group"] for t in rollouts})
        assert groups == list(range(PROMPTS_PER_STEP)), (step, groups)
        assert len(rollouts) == PROMPTS_PER_STEP * GROUP_SIZE
        assert all(kinds[t["prompt_index"]] == "mixed" for t in rollouts), step
        assert len({t["prompt_index"] for t in rollouts}) == PROMPTS_PER_STEP  # 6 mixed prompts: no repeats
        drawn = PROMPTS_PER_STEP + m["data/refill_prompts"]
        # every prompt drawn: a dropped uniform group, a trained one, or an informative surplus
        assert drawn == m["data/refill_uniform_groups"] + PROMPTS_PER_STEP + m["data/refill_surplus_groups"], m
        assert m["data/refill_missing_groups"] == 0 and m["data/filtered_uniform_groups"] == 0
        assert m["rollout/trajectories"] == PROMPTS_PER_STEP * GROUP_SIZE
        drawn_total += int(drawn)
    assert any(metrics[s]["data/refill_rounds"] >= 1 for s in range(1, STEPS + 1))
    sampler = torch.load(dict(list_checkpoints(run_dir / "checkpoints"))[STEPS] / TRAINER_STATE,
                         weights_only=False)["sampler"]
    assert sampler["epoch"] * len(kinds) + sampler["position"] == drawn_total, sampler


def test_refill_cap_on_an_all_uniform_dataset(assets, tmp_path):
    prompts = _write_prompts(tmp_path / "prompts.jsonl", ["uniform"] * 8)
    run_dir = tmp_path / "run"
    proc = run_train(*_overrides(assets, run_dir, prompts, "algorithm.refill_max_rounds=1", "steps=1",
                                 "faults.max_empty_steps=2", "checkpoint.every=0"), timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert "0 of 3 groups informative after 1 refill rounds (6 prompts drawn)" in proc.stderr, tail(proc)
    m = read_metrics(run_dir)[1]
    assert m["data/refill_rounds"] == 1 and m["data/refill_prompts"] == 3
    assert m["data/refill_uniform_groups"] == 6 and m["data/refill_missing_groups"] == 3
