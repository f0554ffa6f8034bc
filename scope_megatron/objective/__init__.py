"""The SCOPE objective: routing, group weights, vocab-parallel log-probs / KL, loss, baselines.

- :mod:`.weights`: Eqs. 4/5 (``scope_weights``), GRPO advantages, group statistics.
- :mod:`.logprobs`: vocab-parallel log p(y), entropy and top-k KL (one autograd Function,
  two forward all-reduces, no backward communication, no fp32 copy of the logits kept).
- :mod:`.loss`: ``plan_batch`` (once per step, global batch) and ``objective_loss`` (per
  micro-batch, global denominators) for scope / opd / grpo / kd / sft, with metrics.
- :mod:`.megatron`: the adapters onto megatron micro-batches: ``old_logprobs`` (forward-only
  lp_old and per-trajectory means) and ``make_loss_fn`` (the per-micro-batch loss for ``train_step``).
"""

from .logprobs import (
    TokenLogprobStats,
    TopkKLResult,
    gather_vocab_parallel_logprobs,
    resolve_tp_group,
    topk_kl,
    vocab_parallel_logprobs,
    vocab_parallel_topk_kl,
)
from .loss import (
    AGGREGATIONS,
    METHODS,
    PRESETS,
    BatchPlan,
    GlobalDenominators,
    ObjectiveConfig,
    ObjectiveOutput,
    TrajectoryCoefficients,
    objective_loss,
    plan_batch,
)
from .megatron import OldLogprobs, make_loss_fn, old_logprobs
from .weights import (
    group_outcome_counts,
    grpo_advantages,
    scope_weights,
    segment_softmax,
    sequence_mean_logprob,
    subset_weight_entropy,
)

__all__ = [
    "AGGREGATIONS",
    "METHODS",
    "PRESETS",
    "BatchPlan",
    "GlobalDenominators",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "OldLogprobs",
    "TokenLogprobStats",
    "TopkKLResult",
    "TrajectoryCoefficients",
    "gather_vocab_parallel_logprobs",
    "group_outcome_counts",
    "grpo_advantages",
    "make_loss_fn",
    "objective_loss",
    "old_logprobs",
    "plan_batch",
    "resolve_tp_group",
    "scope_weights",
    "segment_softmax",
    "sequence_mean_logprob",
    "subset_weight_entropy",
    "topk_kl",
    "vocab_parallel_logprobs",
    "vocab_parallel_topk_kl",
]
