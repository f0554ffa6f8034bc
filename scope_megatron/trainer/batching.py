"""From the broadcast rollout batch to this data-parallel rank's micro-batches.

Every rank receives the same :class:`~scope_megatron.rollout.types.RolloutBatch` and computes the same global
tensors (group ids, response lengths, correctness, teacher means: what ``plan_batch`` needs),
then takes its own share of the trajectories: filter -> plan (every rank computes the same
:class:`~scope_megatron.packing.MicroBatchPlan` from the lengths) -> materialise this rank's
micro-batches only (:func:`~scope_megatron.packing.build_micro_batches`). Two layouts:

* **padded** (``max_tokens_per_microbatch=None``, :func:`~scope_megatron.packing.plan_padded`):
  the trajectories are ordered by length and dealt round-robin over the DP ranks (balanced token
  counts), and cut into micro-batches of ``micro_batch_size`` trajectories, right-padded to the
  longest of each ([b, s]);
* **packed** (a token budget, :func:`~scope_megatron.packing.plan_packed`): balances
  the trajectories over the DP ranks by tokens (Karmarkar-Karp) and packs each rank's share into
  THD rows of at most ``max_tokens_per_microbatch`` tokens ([1, T], ``cu_seqlens``; attention
  stays inside each trajectory), every rank with the same number of micro-batches; with context
  parallelism each row is split over the CP ranks (megatron's load-balanced 2-chunk layout).
  Per-token fields are [1, T] and ``token_trajectory`` names each token's trajectory.

Either way each micro-batch's :class:`~scope_megatron.batch.TokenFields` hold ``targets``,
``response_mask``, ``teacher_logprobs``, ``rollout_logprobs`` (and with top-k
``teacher_topk_ids`` / ``teacher_topk_logprobs``), plus ``trajectory_index`` (the global indices
of the micro-batch's trajectories).

Token layout of one trajectory (prompt P tokens, response R tokens)::

    sequence  = prompt + response                      (P + R)
    tokens    = sequence[:-1]   targets = sequence[1:] (P + R - 1 positions)
    response token j is targets[P - 1 + j]; the response mask marks positions P-1 .. P+R-2

A DP rank left without trajectories (fewer trajectories than DP ranks) gets filler micro-batches
(padded: one; packed: up to the common count): the globally shortest trajectory with an all-zero
mask, so every rank runs the schedule and the gradient all-reduce and adds exactly zero.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import torch

from ..batch import MicroBatch
from ..packing import build_micro_batches, context_parallel_seq_multiple, plan_packed, plan_padded, replan_packed
from ..rollout.types import Trajectory

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
    micro_batches: list[MicroBatch]      # this rank's (PackedMicroBatch when packed)
    # this rank's micro-batches for the forward-only lp_old pass when it has its own (larger)
    # token budget: the same trajectories as micro_batches, packed into fewer rows; None: micro_batches
    forward_micro_batches: list[MicroBatch] | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    padding_fraction: float = 0.0        # padding positions / all positions, over every DP rank's micro-batches
    num_micro_batches: int = 0           # per DP rank (the same on every rank)

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
        uniform = uniform_groups(kept)
        dropped["uniform_groups"] = len(uniform)
        kept = [t for t in kept if t.group not in uniform]
    return kept, dropped


def uniform_groups(trajectories: SequenceABC[Trajectory]) -> set[int]:
    """The groups whose non-empty responses are all correct or all wrong (no signal for a
    group-relative objective); empty responses do not count, as :func:`filter_trajectories`
    drops them first."""
    outcomes: dict[int, set[bool]] = {}
    for t in trajectories:
        if t.response_ids:
            outcomes.setdefault(t.group, set()).add(t.correct)
    return {group for group, seen in outcomes.items() if len(seen) == 1}


def _sequence(t: Trajectory, topk: int = 0) -> dict[str, torch.Tensor]:
    """One trajectory's per-token tensors (P + R - 1 positions, keyed by TokenFields' field names);
    ``topk``: also the teacher's top-k ids / log-probs [P + R - 1, topk] (zero outside the response)."""
    seq = t.prompt_ids + t.response_ids
    n = len(seq) - 1
    start, r = len(t.prompt_ids) - 1, len(t.response_ids)
    mask = torch.zeros(n, dtype=torch.bool)
    teacher = torch.zeros(n, dtype=torch.float32)
    rollout = torch.zeros(n, dtype=torch.float32)
    mask[start:start + r] = True
    teacher[start:start + r] = torch.tensor(t.teacher_logprobs, dtype=torch.float32)
    if len(t.rollout_logprobs) == r:
        rollout[start:start + r] = torch.tensor(t.rollout_logprobs, dtype=torch.float32)
    out = {"tokens": torch.tensor(seq[:-1], dtype=torch.long), "targets": torch.tensor(seq[1:], dtype=torch.long),
           "response_mask": mask, "teacher_logprobs": teacher, "rollout_logprobs": rollout}
    if topk:
        ids = torch.zeros((n, topk), dtype=torch.long)
        logprobs = torch.zeros((n, topk), dtype=torch.float32)
        ids[start:start + r] = torch.tensor(t.teacher_topk_ids, dtype=torch.long).reshape(r, topk)
        logprobs[start:start + r] = torch.tensor(t.teacher_topk_logprobs, dtype=torch.float32).reshape(r, topk)
        out["teacher_topk_ids"], out["teacher_topk_logprobs"] = ids, logprobs
    return out


class _LazySequences(SequenceABC):
    """The trajectories' per-token tensors, built on access: a rank builds only the ones it packs."""

    def __init__(self, trajectories: list[Trajectory], topk: int):
        self._trajectories = trajectories
        self._topk = topk

    def __len__(self) -> int:
        return len(self._trajectories)

    def __getitem__(self, i):  # an int index (the packer reads single items)
        return _sequence(self._trajectories[i], topk=self._topk)


def build_step_data(trajectories: list[Trajectory], *, dp: int, dp_rank: int, micro_batch_size: int, pad_id: int,
                    filter_uniform_groups: bool = False, max_tokens_per_microbatch: int | None = None,
                    cp_size: int = 1, cp_rank: int = 0, oversize: str = "alone",
                    teacher_topk: int = 0, length_multiple: int = 1,
                    max_tokens_per_forward: int | None = None) -> StepData | None:
    """Global tensors and this rank's micro-batches; None when every trajectory was filtered out.

    ``max_tokens_per_microbatch=None`` forms padded micro-batches of ``micro_batch_size``
    trajectories; a budget forms packed ones (``oversize``: what to do with a trajectory longer
    than the budget, see :mod:`scope_megatron.packing`). ``cp_size > 1`` needs a budget.
    ``teacher_topk > 0`` adds the per-token fields ``teacher_topk_ids`` / ``teacher_topk_logprobs``
    ([..., teacher_topk]) from each trajectory's teacher top-k rows, whose shape
    (``R`` rows of ``teacher_topk``) the rollout controller checked when they arrived.
    ``length_multiple``: every micro-batch's sequence dimension (padded s, packed T before the CP
    split) is a multiple of it: :func:`scope_megatron.model.builder.sequence_length_multiple`, for
    sequence parallelism.
    ``max_tokens_per_forward`` (packed only): the token budget of the forward-only lp_old pass's
    micro-batches (``forward_micro_batches``: this rank's training trajectories, repacked); None or
    not above the training budget: the pass runs on the training micro-batches.
    """
    if cp_size > 1 and max_tokens_per_microbatch is None:
        raise ValueError("context parallelism needs packed micro-batches: set max_tokens_per_microbatch")
    kept, dropped = filter_trajectories(trajectories, filter_uniform_groups)
    if not kept:
        return None
    group_map: dict[int, int] = {}
    group_ids = torch.tensor([group_map.setdefault(t.group, len(group_map)) for t in kept], dtype=torch.long)
    lengths = [len(t.response_ids) for t in kept]
    teacher_mean = torch.tensor([sum(t.teacher_logprobs) / len(t.teacher_logprobs) for t in kept], dtype=torch.float64)
    positions = [len(t.prompt_ids) + len(t.response_ids) - 1 for t in kept]  # packed length of each trajectory
    seq_multiple = context_parallel_seq_multiple(cp_size)
    if max_tokens_per_microbatch is None:
        plan = plan_padded(positions, dp=dp, micro_batch_size=micro_batch_size, length_multiple=length_multiple)
    else:
        plan = plan_packed(positions, max_tokens=max_tokens_per_microbatch, dp=dp, oversize=oversize,
                           seq_multiple=seq_multiple)
    micro_batches = build_micro_batches(plan, _LazySequences(kept, teacher_topk), dp_rank=dp_rank, pad_id=pad_id,
                                        seq_multiple=seq_multiple, total_multiple=length_multiple, cp_size=cp_size,
                                        cp_rank=cp_rank)
    count, total = plan.num_micro_batches, plan.padded_positions
    forward_micro_batches = None
    if max_tokens_per_forward is not None:
        if max_tokens_per_microbatch is None:
            raise ValueError("max_tokens_per_forward needs packed micro-batches: set max_tokens_per_microbatch")
        if max_tokens_per_forward > max_tokens_per_microbatch:
            forward_plan = replan_packed(plan, positions, max_tokens=max_tokens_per_forward, seq_multiple=seq_multiple)
            forward_micro_batches = build_micro_batches(
                forward_plan, _LazySequences(kept, teacher_topk), dp_rank=dp_rank, pad_id=pad_id,
                seq_multiple=seq_multiple, total_multiple=length_multiple, cp_size=cp_size, cp_rank=cp_rank)
    real = sum(positions)
    return StepData(trajectories=kept, group_ids=group_ids, response_lengths=torch.tensor(lengths, dtype=torch.long),
                    correct=torch.tensor([t.correct for t in kept], dtype=torch.bool),
                    rewards=torch.tensor([t.reward for t in kept], dtype=torch.float32),
                    teacher_logprob_mean=teacher_mean, micro_batches=micro_batches,
                    forward_micro_batches=forward_micro_batches, dropped=dropped,
                    padding_fraction=1.0 - real / max(total, real, 1), num_micro_batches=count)
