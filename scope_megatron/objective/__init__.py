"""The SCOPE objective: routing, group weights, vocab-parallel log-probs / KL, loss, baselines.

- :mod:`.weights`: Eqs. 4/5 (``scope_weights``), GRPO advantages, group statistics.
- :mod:`.logprobs`: vocab-parallel log p(y), entropy and top-k KL (one autograd Function,
  two forward all-reduces, no backward communication, no fp32 copy of the logits kept).
- :mod:`.loss`: ``plan_batch`` (once per step, global batch) and ``objective_loss`` (per
  micro-batch, global denominators) for scope / opd / grpo / kd / sft, with metrics.
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
    "TokenLogprobStats",
    "TopkKLResult",
    "TrajectoryCoefficients",
    "gather_vocab_parallel_logprobs",
    "group_outcome_counts",
    "grpo_advantages",
    "objective_loss",
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
