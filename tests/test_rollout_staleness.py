"""The staleness bound of asynchronous rollouts (``rollout.max_staleness``), on rank 0's side of
:class:`~scope_megatron.trainer.rollout_source.RolloutSource`, with a controller that records
what it was asked to generate and answers at once.

A batch generated ahead is trained on only when every trajectory's engine weights are at most N
versions behind the policy that trains on it (step t trains with the weights of step t-1); a
batch further behind (a sync was skipped) is generated again with the engines' current weights,
and the next step's generation is started either way.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

import pytest

from scope_megatron.config import load_config
from scope_megatron.rollout.data import PromptSampler
from scope_megatron.rollout.types import RolloutBatch, Trajectory
from scope_megatron.trainer.rollout_source import RolloutSource
from scope_megatron.trainer.state import RunState, StopRequest
from tests.loop_utils import REPO

PROMPTS = 2


class RecordingController:
    """Generates instantly with the weights it was last given; remembers each request."""

    def __init__(self, engine_version: int):
        self.engine_version = engine_version
        self.submitted: list[tuple[int, list[int]]] = []  # (step, dataset indices)

    def submit(self, step: int, records: list[int], refill) -> Future:
        self.submitted.append((step, list(records)))
        future: Future = Future()
        future.set_result(batch_of(step, self.engine_version, records))
        return future


def batch_of(step: int, version: int, indices: list[int]) -> RolloutBatch:
    trajectories = [Trajectory(group=g, prompt_index=i, sample=0, prompt_ids=[1, 2], response_ids=[3],
                               rollout_logprobs=[-0.1], teacher_logprobs=[-0.2], reward=1.0, reward_status="correct",
                               finish="stop", weight_version=str(version)) for g, i in enumerate(indices)]
    return RolloutBatch(step=step, trajectories=trajectories)


def source_with(max_staleness: int, engine_version: int, tmp_path) -> tuple[RolloutSource, RecordingController]:
    cfg = load_config(REPO / "configs" / "tiny_cpu.yaml",
                      [f"rollout.max_staleness={max_staleness}", f"rollout.prompts_per_step={PROMPTS}", "steps=10",
                       f"run_dir={tmp_path}"])
    controller = RecordingController(engine_version)
    state = RunState(sampler=PromptSampler(20, seed=0))
    source = RolloutSource(cfg, state=state, stop=StopRequest(tmp_path, is_controller=True), control_group=None,
                           is_controller=True, dataset=list(range(20)), controller=controller)
    return source, controller


@pytest.mark.parametrize("max_staleness, behind, used", [(1, 1, True), (1, 2, False), (2, 2, True), (2, 3, False)])
def test_a_batch_more_than_max_staleness_behind_is_generated_again(tmp_path, caplog, max_staleness, behind, used):
    step = 5  # trains with the weights of step 4
    source, controller = source_with(max_staleness, engine_version=4, tmp_path=tmp_path)
    ahead = batch_of(step, version=4 - behind, indices=[17, 18])
    source.state.pending_batch = ahead
    with caplog.at_level(logging.WARNING, logger="scope_megatron.trainer.rollout_source"):
        status, batch = source._take_prefetched(step, engine_version=4)
    assert status == "ok"
    assert source.state.pending_batch is None
    if used:
        assert batch is ahead
        assert [s for s, _ in controller.submitted] == [6]  # only the next step, generated ahead
    else:
        assert batch is not ahead
        assert {t.weight_version for t in batch.trajectories} == {"4"}  # the engines' current weights
        assert batch.versions_behind(policy_version=step - 1) == [0] * PROMPTS
        assert [s for s, _ in controller.submitted] == [5, 6]  # regenerated, then the next one ahead
        assert f"{behind} versions behind (rollout.max_staleness = {max_staleness})" in caplog.text
    # the regenerated batch and the next one draw fresh prompts in order from the run's sampler
    expected = PromptSampler(20, seed=0)
    for _, indices in controller.submitted:
        assert indices == expected.next_indices(PROMPTS)


def test_the_last_step_starts_no_generation_ahead(tmp_path):
    source, controller = source_with(1, engine_version=9, tmp_path=tmp_path)
    source.state.pending_batch = batch_of(10, version=9, indices=[0, 1])
    status, _ = source._take_prefetched(10, engine_version=9)
    assert status == "ok" and controller.submitted == []
