"""The objective on megatron micro-batches: the old-log-prob pass and the per-micro-batch loss function.

Both adapters sit between :mod:`scope_megatron.megatron_step` (which runs the schedule) and the
objective's math (:mod:`.logprobs`, :mod:`.loss`):

- :func:`old_logprobs`: lp_old per token with a forward-only pass, and each trajectory's mean
  over its response tokens, summed over every rank that holds part of it;
- :func:`make_loss_fn`: the ``loss_fn`` that :func:`~scope_megatron.megatron_step.train_step`
  calls per micro-batch, with lp_old passed in explicitly and looked up by the micro-batch's
  ``index`` (its position in the step's list, set by the schedule runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .logprobs import vocab_parallel_logprobs, vocab_parallel_topk_kl
from .loss import BatchPlan, ObjectiveConfig, objective_loss

if TYPE_CHECKING:
    from ..megatron_step import LossFn
    from ..trainer.batching import StepData

__all__ = ["OldLogprobs", "make_loss_fn", "old_logprobs", "rollout_means_only"]


@dataclass
class OldLogprobs:
    """lp_old of one step: per token, in the layout of the micro-batches it came from, and per trajectory.

    ``per_micro_batch`` is empty on pipeline stages other than the last (they see no logits);
    ``trajectory_means`` is the same on every rank.
    """

    # one per micro-batch: [b, s] padded or [1, T / cp] packed, on CPU; None: no pass ran
    # (rollout_means_only), and the loss uses the current log-probs detached
    per_micro_batch: list[torch.Tensor] | None
    trajectory_means: torch.Tensor       # [num_trajectories] float64, mean over each response's tokens


def rollout_means_only(data: StepData) -> OldLogprobs:
    """``algorithm.old_logprobs: rollout``: no forward pass; each trajectory's mean is that of the
    engine's sampled-token log-probs (at the rollout temperature, as the trainer's are), and the
    loss takes lp_old as the current log-probs detached (rho = 1: the same value and gradient for
    the single on-policy update this mode is allowed with). Raises ValueError when a trajectory
    has no engine log-probs."""
    means = []
    for t in data.trajectories:
        if len(t.rollout_logprobs) != len(t.response_ids):
            raise ValueError(f"algorithm.old_logprobs=rollout needs the engine's log-prob of every response token: "
                             f"prompt {t.prompt_index} sample {t.sample} has {len(t.rollout_logprobs)} for "
                             f"{len(t.response_ids)} tokens")
        means.append(sum(t.rollout_logprobs) / len(t.rollout_logprobs))
    return OldLogprobs(per_micro_batch=None, trajectory_means=torch.tensor(means, dtype=torch.float64))


def old_logprobs(ddp_model, data: StepData, *, vocab_size: int, temperature: float,
                 device: torch.device) -> OldLogprobs:
    """lp_old of ``data.micro_batches`` under the current weights (forward only, no gradient).

    The pass runs on ``data.forward_micro_batches`` when the step has them (a larger token budget:
    fewer, longer rows) and lays each trajectory's log-probs back out in the training
    micro-batches' layout; otherwise on the training micro-batches themselves.

    The per-trajectory means are sums over each trajectory's response tokens divided by its
    response length: the sums add up over micro-batches, DP ranks and (context parallelism) the CP
    ranks that each hold part of a packed trajectory, in one all-reduce over the world on
    ``device``. Tensor-parallel ranks of one group hold the same (all-reduced) log-probs, so only
    TP rank 0 contributes; pipeline stages without logits contribute zeros.
    """
    from megatron.core import parallel_state as ps

    from ..megatron_step import run_forward

    def output_fn(logits, mb):
        return vocab_parallel_logprobs(logits, mb.fields.targets, vocab_size=vocab_size, temperature=temperature,
                                       check_finite=False).detach()

    forward = data.forward_micro_batches or data.micro_batches
    outputs = [lp.cpu() for lp in run_forward(ddp_model, forward, output_fn)]
    sums = torch.zeros(data.num_trajectories, dtype=torch.float64)
    for mb, lp in zip(forward, outputs):
        mask = mb.fields.response_mask
        sums.index_add_(0, mb.fields.trajectory_of_tokens()[mask], lp[mask].double())
    if ps.get_tensor_model_parallel_rank() != 0:
        sums.zero_()
    sums = sums.to(device)
    dist.all_reduce(sums)
    means = sums.cpu() / data.response_lengths.double()
    if forward is data.micro_batches or not outputs:  # same layout, or a stage without logits
        return OldLogprobs(per_micro_batch=outputs, trajectory_means=means)
    by_trajectory = _per_trajectory(forward, outputs, device)
    return OldLogprobs(per_micro_batch=[_lay_out(by_trajectory, mb) for mb in data.micro_batches],
                       trajectory_means=means)


def _per_trajectory(micro_batches, outputs, device) -> dict[int, torch.Tensor]:
    """{global trajectory index: log-probs [L] over its whole sequence} from packed forward outputs."""
    from ..packing import gather_from_context_parallel, unpack

    out: dict[int, torch.Tensor] = {}
    for mb, lp in zip(micro_batches, outputs):
        if mb.cp_size == 1 and mb.num_loss_tokens == 0:
            continue  # a filler: nothing of it is needed
        # under CP each rank holds two chunks of every slot, and the training rows chunk their
        # (differently placed) slots too, so the whole row is gathered first: a collective, which
        # every CP rank runs for every micro-batch (a CP shard may hold no loss token of a real row)
        whole = gather_from_context_parallel(lp.to(device), mb).cpu()
        for trajectory, piece in zip(mb.fields.trajectory_index.tolist(), unpack(whole, mb)):
            out[trajectory] = piece
    return out


def _lay_out(by_trajectory: dict[int, torch.Tensor], mb) -> torch.Tensor:
    """One training micro-batch's lp_old in its own layout ([b, s] padded, [1, T / cp] packed);
    zero on padding and for trajectories without response tokens here (fillers)."""
    from ..batch import PackedMicroBatch

    trajectories = mb.fields.trajectory_index.tolist()
    if not isinstance(mb, PackedMicroBatch):
        values = torch.zeros(mb.tokens.shape, dtype=torch.float32)
        for row, trajectory in enumerate(trajectories):
            if trajectory in by_trajectory:
                piece = by_trajectory[trajectory]
                values[row, :piece.numel()] = piece
        return values
    whole = torch.zeros(int(mb.slot_bounds[-1]), dtype=torch.float32)
    for start, trajectory in zip(mb.slot_bounds[:-1].tolist(), trajectories):
        if trajectory in by_trajectory:
            piece = by_trajectory[trajectory]
            whole[start:start + piece.numel()] = piece
    return whole[mb.local_index()].unsqueeze(0)


def make_loss_fn(objective: ObjectiveConfig, plan: BatchPlan, *, vocab_size: int, temperature: float,
                 supervised: bool, use_topk: bool, old_logprobs: OldLogprobs | None,
                 ref_logprobs: OldLogprobs | None = None) -> LossFn:
    """The per-micro-batch loss for :func:`~scope_megatron.megatron_step.train_step`.

    ``old_logprobs``: the step's lp_old (from :func:`old_logprobs` on the same micro-batches, in
    the same order); None, or one without per-micro-batch values (:func:`rollout_means_only`), uses
    the current log-probs detached (rho = 1, and the only choice for ``supervised`` runs, which
    have no old policy). ``supervised`` also drops the teacher's and
    the rollout engine's log-probs (MLE on given text). ``use_topk`` computes the sampled-token
    log-probs and the top-k KL against the teacher's top-k rows in one pass over the logits.
    ``ref_logprobs``: the initial policy's log-probs in the same layout (GRPO's KL term).
    """

    def loss_fn(logits, mb):
        fields = mb.fields
        topk = None
        if use_topk:
            out = vocab_parallel_topk_kl(logits, fields.targets, fields.teacher_topk_ids,
                                         fields.teacher_topk_logprobs, vocab_size=vocab_size,
                                         direction=objective.topk_kl, tail=objective.topk_tail,
                                         temperature=temperature, return_entropy=True, check_finite=False)
            lp, topk, entropy = out.target_logprobs, out.topk_kl, out.entropy
        else:
            lp, entropy = vocab_parallel_logprobs(logits, fields.targets, vocab_size=vocab_size,
                                                  temperature=temperature, return_entropy=True, check_finite=False)
        old = None
        if old_logprobs is not None and old_logprobs.per_micro_batch is not None:
            old = old_logprobs.per_micro_batch[mb.index].to(logits.device)
        ref = None if ref_logprobs is None else ref_logprobs.per_micro_batch[mb.index].to(logits.device)
        coefficients = plan.select(fields.trajectory_index.cpu()).to(logits.device)
        out = objective_loss(objective, coefficients, plan.denominators, logprobs=lp, response_mask=fields.response_mask,
                             old_logprobs=old, ref_logprobs=ref,
                             teacher_logprobs=None if supervised else fields.teacher_logprobs,
                             rollout_logprobs=None if supervised else fields.rollout_logprobs, entropy=entropy,
                             topk_kl=topk, token_trajectory=fields.token_trajectory, check_finite=False)
        return out.loss, out.metrics

    return loss_fn
