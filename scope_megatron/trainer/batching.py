"""From the broadcast rollout batch to this data-parallel rank's micro-batches.

Every rank receives the same :class:`~.controller.RolloutBatch` and computes the same global
tensors (group ids, response lengths, correctness, teacher means: what ``plan_batch`` needs),
then takes its own share of the trajectories: the trajectories are ordered by length and dealt
round-robin over the DP ranks (balanced token counts), and cut into micro-batches of
``micro_batch_size`` trajectories.

Token layout of one trajectory (prompt P tokens, response R tokens)::

    sequence  = prompt + response                      (P + R)
    tokens    = sequence[:-1]   targets = sequence[1:] (P + R - 1 positions)
    response token j is targets[P - 1 + j]; the response mask marks positions P-1 .. P+R-2

A DP rank left without trajectories (fewer trajectories than DP ranks) gets one micro-batch
with an all-zero mask, so every rank runs the schedule and the gradient all-reduce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..megatron_step import MicroBatch
from .controller import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class StepData:
    """The filtered global batch and this rank's micro-batches."""

    trajectories: list[Trajectory]       # kept, global order (row i of every [N] tensor)
    group_ids: torch.Tensor              # [N] int64, 0..num_groups-1
    response_lengths: torch.Tensor       # [N] int64
    correct: torch.Tensor                # [N] bool
    rewards: torch.Tensor                # [N] float32
    teacher_logprob_mean: torch.Tensor   # [N] float64
    micro_batches: list[MicroBatch]
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def num_trajectories(self) -> int:
        return len(self.trajectories)


def filter_trajectories(trajectories: list[Trajectory], filter_uniform_groups: bool) -> tuple[list[Trajectory], dict[str, int]]:
    """Drop empty responses (their perplexity is undefined), and optionally all-correct / all-wrong
    groups. Returns the kept trajectories and counts of what was dropped."""
    dropped = {"empty_responses": 0, "uniform_groups": 0}
    kept = []
    for t in trajectories:
        if not t.response_ids:
            dropped["empty_responses"] += 1
            continue
        if len(t.teacher_logprobs) != len(t.response_ids):
            raise ValueError(f"trajectory (prompt {t.prompt_index}, sample {t.sample}): {len(t.teacher_logprobs)} "
                             f"teacher log-probs for {len(t.response_ids)} response tokens")
        kept.append(t)
    if filter_uniform_groups:
        by_group: dict[int, list[Trajectory]] = {}
        for t in kept:
            by_group.setdefault(t.group, []).append(t)
        kept = []
        for members in by_group.values():
            outcomes = {m.correct for m in members}
            if len(outcomes) == 1:
                dropped["uniform_groups"] += 1
                continue
            kept.extend(members)
    return kept, dropped


def _micro_batch(trajs: list[Trajectory], rows: list[int], pad_id: int, empty: bool = False) -> MicroBatch:
    seqs = [t.prompt_ids + t.response_ids for t in trajs]
    width = max(len(s) - 1 for s in seqs)
    b = len(trajs)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.bool)
    teacher = torch.zeros((b, width), dtype=torch.float32)
    rollout = torch.zeros((b, width), dtype=torch.float32)
    for i, (t, seq) in enumerate(zip(trajs, seqs)):
        n = len(seq) - 1
        tokens[i, :n] = torch.tensor(seq[:-1], dtype=torch.long)
        targets[i, :n] = torch.tensor(seq[1:], dtype=torch.long)
        start, r = len(t.prompt_ids) - 1, len(t.response_ids)
        if not empty:
            mask[i, start:start + r] = True
        teacher[i, start:start + r] = torch.tensor(t.teacher_logprobs, dtype=torch.float32)
        if len(t.rollout_logprobs) == r:
            rollout[i, start:start + r] = torch.tensor(t.rollout_logprobs, dtype=torch.float32)
    extras = {"targets": targets, "mask": mask, "teacher_lp": teacher, "rollout_lp": rollout,
              "rows": torch.tensor(rows, dtype=torch.long)}
    return MicroBatch(tokens, extras, int(mask.sum()))


def rank_share(lengths: list[int], dp: int, dp_rank: int) -> list[int]:
    """Indices of the trajectories this DP rank trains on: length-sorted, dealt round-robin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return sorted(order[dp_rank::dp])


def build_step_data(trajectories: list[Trajectory], *, dp: int, dp_rank: int, micro_batch_size: int, pad_id: int,
                    filter_uniform_groups: bool = False) -> StepData | None:
    """Global tensors and this rank's micro-batches; None when every trajectory was filtered out."""
    kept, dropped = filter_trajectories(trajectories, filter_uniform_groups)
    if not kept:
        return None
    group_map: dict[int, int] = {}
    group_ids = torch.tensor([group_map.setdefault(t.group, len(group_map)) for t in kept], dtype=torch.long)
    lengths = [len(t.response_ids) for t in kept]
    teacher_mean = torch.tensor([sum(t.teacher_logprobs) / len(t.teacher_logprobs) for t in kept], dtype=torch.float64)
    mine = rank_share([len(t.prompt_ids) + len(t.response_ids) for t in kept], dp, dp_rank)
    micro_batches = []
    for i in range(0, len(mine), micro_batch_size):
        rows = mine[i:i + micro_batch_size]
        micro_batches.append(_micro_batch([kept[r] for r in rows], rows, pad_id))
    if not micro_batches:  # fewer trajectories than DP ranks: a zero-weight micro-batch
        micro_batches.append(_micro_batch([kept[0]], [0], pad_id, empty=True))
    return StepData(trajectories=kept, group_ids=group_ids, response_lengths=torch.tensor(lengths, dtype=torch.long),
                    correct=torch.tensor([t.correct for t in kept], dtype=torch.bool),
                    rewards=torch.tensor([t.reward for t in kept], dtype=torch.float32),
                    teacher_logprob_mean=teacher_mean, micro_batches=micro_batches, dropped=dropped)
