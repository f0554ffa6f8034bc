"""Saved rollouts (``logging.save_rollouts``) read back for ``data.replay``: the numbers survive the
file exactly, files that could not be trained on are refused naming the file and line, and the
config refuses a replay that needs engines, new prompts or steps the directory does not hold.
(That a replayed step reproduces the original step's loss is in tests/test_loop_topk.py.)"""

from __future__ import annotations

import json
import math

import pytest

from scope_megatron.config import ConfigError, load_config
from scope_megatron.rollout.replay import read_rollouts, resolve_replay_dir, write_rollouts
from scope_megatron.rollout.types import RolloutBatch, Trajectory
from tests.loop_utils import TINY_CONFIG


def _trajectory(group: int = 0, sample: int = 0) -> Trajectory:
    return Trajectory(group=group, prompt_index=7, sample=sample, prompt_ids=[1, 2, 3], response_ids=[4, 5],
                      rollout_logprobs=[-0.1 / 3, -2.0 ** -30], teacher_logprobs=[-1e-300, -123.456789012345678],
                      reward=1.0, reward_status="correct", finish="stop", weight_version="3",
                      teacher_topk_ids=[[4, 9], [5, 0]], teacher_topk_logprobs=[[-0.5, float("-inf")], [-0.25, -3.0]])


def test_round_trip_is_exact(tmp_path):
    batch = RolloutBatch(step=3, trajectories=[_trajectory(0, 0), _trajectory(0, 1), _trajectory(1, 0)])
    path = write_rollouts(tmp_path / "rollouts", batch)
    assert path.name == "step_00000003.jsonl" and not list(path.parent.glob("*.partial"))
    assert json.loads(path.read_text().splitlines()[0])["correct"] is True  # for readers of the file
    back = read_rollouts(resolve_replay_dir(tmp_path), 3, vocab_size=10, teacher_topk=2)
    assert back.step == 3 and back.trajectories == batch.trajectories  # floats bit for bit, -inf included
    assert math.isinf(back.trajectories[0].teacher_topk_logprobs[0][1])


@pytest.mark.parametrize("change, message", [
    ({"response_ids": [4, 10]}, "outside the student's vocabulary of 10"),
    ({"teacher_logprobs": [-1.0]}, "1 teacher log-probs for 2 response tokens"),
    ({"rollout_logprobs": [-1.0, -1.0, -1.0]}, "3 rollout log-probs for 2 response tokens"),
    ({"teacher_topk_ids": [], "teacher_topk_logprobs": []}, "the file has 0 rows of 0"),
    ({"teacher_topk_ids": [[4, 9, 1], [5, 0, 1]]}, "the file has 2 rows of 3"),
    ({"teacher_topk_logprobs": [[-0.5], [-0.25, -3.0]]}, "do not match its top-k ids"),
    ({"teacher_topk_ids": [[4, 12], [5, 0]]}, "teacher top-k ids outside"),
])
def test_files_that_cannot_be_trained_on_are_refused(tmp_path, change, message):
    bad = {**vars(_trajectory()), **change}
    write_rollouts(tmp_path, RolloutBatch(step=1, trajectories=[_trajectory()]))
    with (tmp_path / "step_00000001.jsonl").open("a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="step_00000001.jsonl:2") as info:
        read_rollouts(tmp_path, 1, vocab_size=10, teacher_topk=2)
    assert message in str(info.value)


def test_missing_fields_and_missing_steps(tmp_path):
    (tmp_path / "step_00000001.jsonl").write_text(json.dumps({"group": 0, "prompt_ids": [1]}) + "\n")
    with pytest.raises(ValueError, match="missing .*response_ids"):
        read_rollouts(tmp_path, 1, vocab_size=10, teacher_topk=0)
    with pytest.raises(ValueError, match="saved no rollouts for step 2"):
        read_rollouts(tmp_path, 2, vocab_size=10, teacher_topk=0)


@pytest.mark.parametrize("override, field", [
    ("eval.every=1", "eval.every"),
    ("rollout.max_staleness=1", "rollout.max_staleness"),
    ("placement=colocated", "placement"),
    ("algorithm.preset=sft", "algorithm.preset"),
    ("logging.save_rollouts=true", "logging.save_rollouts"),
    ("steps=3", "data.replay"),  # the directory holds steps 1 and 2
])
def test_config_refuses_what_a_replay_cannot_do(tmp_path, override, field):
    for step in (1, 2):
        write_rollouts(tmp_path / "rollouts", RolloutBatch(step=step, trajectories=[_trajectory()]))
    base = [f"data.replay={tmp_path}", "steps=2", "data.paths=[]"]
    cfg = load_config(TINY_CONFIG, base)  # a run directory: its rollouts/ is read; no prompt files needed
    assert cfg.data.replay == str(tmp_path) and not cfg.uses_engines
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, [*base, override, *(["eval.benchmarks=[x.jsonl]"] if "eval" in override else [])])
    assert info.value.field == field, str(info.value)
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(TINY_CONFIG, [f"data.replay={tmp_path / 'nowhere'}"])
