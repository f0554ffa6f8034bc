"""The SCOPE loss and its baselines (opd, grpo, kd/sft), with global denominators and metrics.

A training step is split in two:

1. :func:`plan_batch`, ONCE per step over the GLOBAL batch (every trajectory of every
   data-parallel rank and micro-batch; only per-trajectory numbers are needed): routing,
   group weights (Eqs. 4/5, :mod:`.weights`), GRPO advantages, and the denominators of the
   token aggregation (:class:`GlobalDenominators`). Returns a :class:`BatchPlan`.
2. :func:`objective_loss`, once per micro-batch, on per-token tensors of that micro-batch and
   the plan's coefficients for its trajectories (``plan.select(index)``). Every term is a sum
   over the micro-batch's tokens divided by a GLOBAL denominator, so

       sum over micro-batches and DP ranks of objective_loss(...).loss == full-batch loss

   (exactly, up to float summation order), and so are the gradients: the result does not
   depend on TP/PP/DP layout or on the number of micro-batches. Metrics are additive the same way.

The per-token SCOPE terms (``docs/method.md`` §4), with ``rho = exp(lp - lp_old)`` (value 1 at
the single on-policy update, gradient = grad lp) and ``sg`` = stop-gradient:

* MLE path, correct trajectories (Eq. 2):   ``l = -w_stu[i] * rho``   (``mle_form="nll"``:
  ``-w_stu[i] * lp``, the reference code's SFT term; same gradient at rho = 1)
* KL path, incorrect trajectories (Eq. 3):  ``l = +w_tea[i] * rho * sg(lp_old - lp_T)``, i.e. a
  policy-gradient term with advantage ``A = -w_tea[i] * (lp_old - lp_T)``; optionally plus
  ``topk_kl_coef * w_tea[i] * KL_topk`` (beyond the paper).
* With ``clip_eps`` set, each policy-gradient term uses PPO's ``-min(rho A, clip(rho) A)``.

Aggregation (``ObjectiveConfig.aggregation``), dividing each path's token sum by:

=================== ======================== ===================================== ==========
name                MLE path                 KL path                               source
=================== ======================== ===================================== ==========
``ref_token_mean``  MLE-path tokens          all response tokens                   ref. code
``path_token_mean`` MLE-path tokens          KL-path tokens                        variant
``token_mean``      all response tokens      all response tokens                   variant
``paper_token_sum`` number of groups         number of groups                      Eq. 6
=================== ======================== ===================================== ==========

A path with no token in the global batch contributes 0 (its sum is 0; the divisor is taken as 1).

Baselines in the same code path: ``opd`` (every rollout on the KL path, weight 1), ``grpo``
(group mean/std outcome advantage, PPO clip 0.2, optional k3 KL to the initial policy; token
mean over all response tokens), ``kd`` / ``sft`` (weighted MLE on given sequences, ``-w lp``).

Megatron contract: megatron-core's schedule wants ``loss_func -> (loss_sum, num_tokens, report)``
with ``calculate_per_token_loss=True`` and divides the gradients by the sum of ``num_tokens`` over
micro-batches and DP ranks. :meth:`ObjectiveOutput.megatron_loss_tuple` returns
``(loss * D, num_tokens, metrics)`` with ``D`` = global response tokens and ``num_tokens`` = this
micro-batch's response tokens (they sum to ``D``), so megatron's division restores exactly the sum
of our per-micro-batch losses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .weights import (
    Normalization,
    ScoreSign,
    _as_bool,
    _require_1d,
    _require_finite,
    _require_integer,
    _require_positive_finite,
    group_outcome_counts,
    grpo_advantages,
    scope_weights,
    subset_weight_entropy,
)

logger = logging.getLogger(__name__)

Method = Literal["scope", "opd", "grpo", "kd", "sft"]
Aggregation = Literal["ref_token_mean", "path_token_mean", "token_mean", "paper_token_sum"]
MleForm = Literal["ratio", "nll"]
TopkKind = Literal["none", "forward", "reverse"]
OffPolicyCorrection = Literal["none", "tis"]

METHODS: tuple[str, ...] = ("scope", "opd", "grpo", "kd", "sft")
AGGREGATIONS: tuple[str, ...] = ("ref_token_mean", "path_token_mean", "token_mean", "paper_token_sum")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Every setting of the objective; defaults are SCOPE as in ``docs/method.md``.

    Attributes:
        method: ``scope``, ``opd``, ``grpo``, ``kd`` or ``sft`` (``kd`` = ``sft`` on teacher text).
        tau, normalize, student_sign, teacher_sign, student_uniform, teacher_uniform: the group
            weights, see :func:`scope_megatron.objective.weights.scope_weights`.
        mle_coef, kl_coef: path coefficients (paper: 1 and 1).
        aggregation: token aggregation, see the module docstring (default: reference code).
        clip_eps: PPO clip of rho for several updates per batch; None = unclipped.
        mle_form: ``"ratio"`` (Eq. 2, ``-w rho``) or ``"nll"`` (``-w lp``); None = ``"ratio"`` for
            scope/opd and ``"nll"`` for kd/sft.
        sampled_kl_coef: weight of the sampled-token reverse-KL estimator on the KL path (0: off).
        topk_kl: ``"none"``, ``"forward"`` or ``"reverse"``: the top-k KL the caller computes with
            :func:`~scope_megatron.objective.logprobs.vocab_parallel_topk_kl` and passes as
            ``topk_kl``; ``topk_tail`` is its ``tail`` argument; ``topk_kl_coef`` its weight.
        grpo_eps: epsilon of the GRPO std normalisation.
        grpo_kl_beta: coefficient of the k3 KL to the initial policy (paper: 1e-4; 0 = off).
        off_policy_correction: ``"none"`` or ``"tis"``: truncated importance sampling for data
            generated by an older policy than the trainer's (asynchronous rollouts, or the
            engine's numerics): every per-token loss term is multiplied by
            ``min(exp(lp_old - lp_rollout), tis_cap)`` (detached), with ``lp_rollout`` the
            engine's log-probs of the sampled tokens. The SCOPE weights are unchanged (they use
            the trainer's log-probs). Needs ``rollout_logprobs`` in :func:`objective_loss`.
        tis_cap: the truncation ``C`` of the importance ratio (> 0).
    """

    method: Method = "scope"
    tau: float = 1.0
    normalize: Normalization = "mean1"
    student_sign: ScoreSign = "paper"
    teacher_sign: ScoreSign = "paper"
    student_uniform: bool = False
    teacher_uniform: bool = False
    mle_coef: float = 1.0
    kl_coef: float = 1.0
    aggregation: Aggregation = "ref_token_mean"
    clip_eps: float | None = None
    mle_form: MleForm | None = None
    sampled_kl_coef: float = 1.0
    topk_kl: TopkKind = "none"
    topk_tail: bool = False
    topk_kl_coef: float = 1.0
    grpo_eps: float = 1e-6
    grpo_kl_beta: float = 0.0
    off_policy_correction: OffPolicyCorrection = "none"
    tis_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _require_positive_finite("tau", self.tau)
        if self.normalize not in ("mean1", "sum1"):
            raise ValueError(f"normalize must be 'mean1' or 'sum1', got {self.normalize!r}")
        for name in ("student_sign", "teacher_sign"):
            if getattr(self, name) not in ("paper", "reversed"):
                raise ValueError(f"{name} must be 'paper' or 'reversed', got {getattr(self, name)!r}")
        if self.clip_eps is not None and not (math.isfinite(self.clip_eps) and 0 < self.clip_eps < 1):
            raise ValueError(f"clip_eps must be None or in (0, 1), got {self.clip_eps!r}")
        if self.mle_form not in (None, "ratio", "nll"):
            raise ValueError(f"mle_form must be None, 'ratio' or 'nll', got {self.mle_form!r}")
        if self.topk_kl not in ("none", "forward", "reverse"):
            raise ValueError(f"topk_kl must be 'none', 'forward' or 'reverse', got {self.topk_kl!r}")
        for name in ("mle_coef", "kl_coef", "sampled_kl_coef", "topk_kl_coef", "grpo_kl_beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        _require_positive_finite("grpo_eps", self.grpo_eps)
        if self.off_policy_correction not in ("none", "tis"):
            raise ValueError(f"off_policy_correction must be 'none' or 'tis', got {self.off_policy_correction!r}")
        _require_positive_finite("tis_cap", self.tis_cap)
        if self.off_policy_correction == "tis" and self.method in ("kd", "sft"):
            raise ValueError(f"off_policy_correction='tis' needs sampled rollouts; method {self.method!r} trains on "
                             "given text")

    @property
    def effective_mle_form(self) -> MleForm:
        """The MLE term's form after applying the method default."""
        if self.mle_form is not None:
            return self.mle_form
        return "nll" if self.method in ("kd", "sft") else "ratio"

    @classmethod
    def preset(cls, name: str, **overrides: object) -> "ObjectiveConfig":
        """A named configuration of the paper's comparisons, with ``overrides`` applied.

        Names: ``scope``; its ablations ``scope_uniform`` ("w/o DPAW"), ``scope_no_student_weight``,
        ``scope_no_teacher_weight``, ``scope_opposite_student``, ``scope_opposite_teacher``,
        ``scope_reference_code_signs`` (the released scripts' effective signs: student reversed);
        baselines ``opd``, ``grpo`` (clip 0.2, token mean, and the paper's k3 KL to the initial
        policy, ``grpo_kl_beta=1e-4``: :func:`objective_loss` then needs ``ref_logprobs``, which the
        trainer computes with a frozen copy of the initial student), ``kd``, ``sft``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        settings = dict(PRESETS[name])
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]


PRESETS: dict[str, dict[str, object]] = {
    "scope": {},
    "scope_uniform": {"student_uniform": True, "teacher_uniform": True},
    "scope_no_student_weight": {"student_uniform": True},
    "scope_no_teacher_weight": {"teacher_uniform": True},
    "scope_opposite_student": {"student_sign": "reversed"},
    "scope_opposite_teacher": {"teacher_sign": "reversed"},
    "scope_reference_code_signs": {"student_sign": "reversed"},
    "opd": {"method": "opd"},
    "grpo": {"method": "grpo", "clip_eps": 0.2, "aggregation": "token_mean", "grpo_kl_beta": 1e-4},
    "kd": {"method": "kd", "aggregation": "token_mean"},
    "sft": {"method": "sft", "aggregation": "token_mean"},
}


@dataclass(frozen=True)
class GlobalDenominators:
    """Token and group counts of the GLOBAL batch (all DP ranks and micro-batches)."""

    response_tokens: int  # all response tokens
    mle_tokens: int  # response tokens of trajectories on the MLE path
    kl_tokens: int  # response tokens of trajectories on the KL path
    groups: int  # prompts
    trajectories: int

    def divisors(self, aggregation: Aggregation) -> tuple[float, float, float]:
        """``(mle, kl, all)`` divisors of the token sums for ``aggregation`` (0 is replaced by 1)."""
        if aggregation == "ref_token_mean":
            values = (self.mle_tokens, self.response_tokens, self.response_tokens)
        elif aggregation == "path_token_mean":
            values = (self.mle_tokens, self.kl_tokens, self.response_tokens)
        elif aggregation == "token_mean":
            values = (self.response_tokens,) * 3
        elif aggregation == "paper_token_sum":
            values = (self.groups,) * 3
        else:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        return tuple(float(max(v, 1)) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class TrajectoryCoefficients:
    """Per-trajectory coefficients of one micro-batch's trajectories ([B] each)."""

    mle_weight: torch.Tensor  # w_stu (scope), sequence weight (kd/sft), else 0
    kl_weight: torch.Tensor  # w_tea (scope), 1 (opd), else 0
    advantage: torch.Tensor  # GRPO outcome advantage, else 0
    on_mle_path: torch.Tensor  # bool
    on_kl_path: torch.Tensor  # bool

    def to(self, device: torch.device | str) -> "TrajectoryCoefficients":
        """A copy on ``device``."""
        return TrajectoryCoefficients(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def __len__(self) -> int:
        return int(self.mle_weight.shape[0])


@dataclass(frozen=True)
class BatchPlan:
    """What :func:`plan_batch` computes once per step over the global batch."""

    coefficients: TrajectoryCoefficients  # [N], global trajectory order
    denominators: GlobalDenominators
    metrics: dict[str, float] = field(default_factory=dict)  # global, already final

    def select(self, index: torch.Tensor | slice | list[int]) -> TrajectoryCoefficients:
        """Coefficients of the trajectories ``index`` (e.g. one micro-batch's rows)."""
        c = self.coefficients
        return TrajectoryCoefficients(c.mle_weight[index], c.kl_weight[index], c.advantage[index],
                                      c.on_mle_path[index], c.on_kl_path[index])


def plan_batch(
    config: ObjectiveConfig,
    *,
    group_ids: torch.Tensor,
    response_lengths: torch.Tensor,
    correct: torch.Tensor | None = None,
    student_logprob_mean: torch.Tensor | None = None,
    teacher_logprob_mean: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    sequence_weights: torch.Tensor | None = None,
) -> BatchPlan:
    """Routing, weights, advantages and denominators for the GLOBAL batch (call once per step).

    Args (all [N], one entry per trajectory of the global batch):
        group_ids: integer prompt id of each trajectory.
        response_lengths: number of response tokens (>= 1; a zero-length response raises,
            drop it before planning).
        correct: bool verifier outcome; required for ``scope`` (routing) and used for metrics
            and, if ``rewards`` is None, as the ``grpo`` reward.
        student_logprob_mean / teacher_logprob_mean: mean response-token log-prob under the
            student (lp_old) / the teacher (``scope``; a uniform path does not need its own).
            Also used for perplexity metrics when given.
        rewards: float rewards for ``grpo`` (default ``correct``).
        sequence_weights: per-sequence weights for ``kd``/``sft`` (default 1).

    Returns:
        a :class:`BatchPlan`; ``plan.select(index)`` gives a micro-batch's coefficients.
    """
    _require_1d("group_ids", group_ids)
    n = int(group_ids.shape[0])
    _require_integer("group_ids", group_ids)
    _require_1d("response_lengths", response_lengths, n)
    _require_integer("response_lengths", response_lengths)
    if n == 0:
        raise ValueError("group_ids is empty: the global batch has no trajectory")
    if bool((response_lengths <= 0).any()):
        empty = (response_lengths <= 0).nonzero().flatten()[:8].tolist()
        raise ValueError(f"response_lengths: trajectories {empty} have no response tokens; drop zero-length "
                         "responses before planning (their perplexity is undefined)")
    device = group_ids.device
    if correct is not None:
        _require_1d("correct", correct, n)
        correct = _as_bool("correct", correct)
    for name, tensor in (("student_logprob_mean", student_logprob_mean), ("teacher_logprob_mean", teacher_logprob_mean),
                         ("rewards", rewards), ("sequence_weights", sequence_weights)):
        if tensor is not None:
            _require_1d(name, tensor, n)

    zeros = torch.zeros(n, dtype=torch.float32, device=device)
    false = torch.zeros(n, dtype=torch.bool, device=device)
    mle_weight, kl_weight, advantage = zeros, zeros, zeros
    on_mle, on_kl = false, false
    method = config.method
    if method == "scope":
        if correct is None:
            raise ValueError("correct is required for method 'scope' (routing)")
        if student_logprob_mean is None and not config.student_uniform:
            raise ValueError("student_logprob_mean is required for method 'scope' (Eq. 4)")
        if teacher_logprob_mean is None and not config.teacher_uniform:
            raise ValueError("teacher_logprob_mean is required for method 'scope' (Eq. 5)")
        mle_weight, kl_weight = scope_weights(
            student_logprob_mean if student_logprob_mean is not None else zeros,
            teacher_logprob_mean if teacher_logprob_mean is not None else zeros,
            correct, group_ids, tau=config.tau, normalize=config.normalize,
            student_sign=config.student_sign, teacher_sign=config.teacher_sign,
            student_uniform=config.student_uniform, teacher_uniform=config.teacher_uniform)
        mle_weight, kl_weight = mle_weight.float(), kl_weight.float()
        on_mle, on_kl = correct.clone(), ~correct
    elif method == "opd":
        kl_weight = torch.ones(n, dtype=torch.float32, device=device)
        on_kl = ~false
    elif method == "grpo":
        if rewards is None:
            if correct is None:
                raise ValueError("method 'grpo' needs rewards (or correct)")
            rewards = correct.float()
        advantage = grpo_advantages(rewards, group_ids, eps=config.grpo_eps)
    else:  # kd / sft
        if sequence_weights is not None:
            _require_finite("sequence_weights", sequence_weights)
            if bool((sequence_weights < 0).any()):
                raise ValueError("sequence_weights must be >= 0")
            mle_weight = sequence_weights.detach().float()
        else:
            mle_weight = torch.ones(n, dtype=torch.float32, device=device)
        on_mle = ~false

    lengths = response_lengths.long()
    denominators = GlobalDenominators(
        response_tokens=int(lengths.sum()),
        mle_tokens=int(lengths[on_mle].sum()),
        kl_tokens=int(lengths[on_kl].sum()),
        groups=int(torch.unique(group_ids).numel()),
        trajectories=n,
    )
    metrics = _plan_metrics(config, group_ids, correct, student_logprob_mean, teacher_logprob_mean,
                            mle_weight, kl_weight, on_mle, on_kl, denominators)
    logger.debug("plan_batch(%s): %s", method, denominators)
    return BatchPlan(TrajectoryCoefficients(mle_weight, kl_weight, advantage, on_mle, on_kl), denominators, metrics)


def _plan_metrics(config: ObjectiveConfig, group_ids: torch.Tensor, correct: torch.Tensor | None,
                  student_logprob_mean: torch.Tensor | None, teacher_logprob_mean: torch.Tensor | None,
                  mle_weight: torch.Tensor, kl_weight: torch.Tensor, on_mle: torch.Tensor, on_kl: torch.Tensor,
                  denominators: GlobalDenominators) -> dict[str, float]:
    """Global per-step metrics (groups, per-path counts, weight entropy, perplexities)."""
    d = denominators
    metrics: dict[str, float] = {
        "tokens/response": float(d.response_tokens),
        "tokens/mle_path": float(d.mle_tokens),
        "tokens/kl_path": float(d.kl_tokens),
        "trajectories/mle_path": float(on_mle.sum()),
        "trajectories/kl_path": float(on_kl.sum()),
        "groups": float(d.groups),
    }
    if correct is not None:
        counts = group_outcome_counts(correct, group_ids)
        for key in ("all_correct", "all_wrong", "mixed"):
            metrics[f"groups/{key}_fraction"] = counts[key] / max(counts["groups"], 1)
        metrics["accuracy"] = float(correct.float().mean())
    if config.method == "scope":
        for path, weights, members in (("student", mle_weight, on_mle), ("teacher", kl_weight, on_kl)):
            entropy, uniform = subset_weight_entropy(weights, members, group_ids)
            metrics[f"weight_entropy/{path}"] = entropy
            metrics[f"weight_entropy/{path}_uniform"] = uniform
            metrics[f"weight_max/{path}"] = float(weights.max())
    for name, lp_mean, members in (("student", student_logprob_mean, on_mle), ("teacher", teacher_logprob_mean, on_kl)):
        if lp_mean is None:
            continue
        finite = torch.isfinite(lp_mean)
        if not bool(finite.any()):
            continue
        ppl = torch.exp(-lp_mean.detach().double()[finite])
        metrics[f"ppl/{name}_mean"] = float(ppl.mean())
        metrics[f"ppl/{name}_median"] = float(ppl.median())
        metrics[f"ppl/{name}_max"] = float(ppl.max())
        on_path = members & finite
        if bool(on_path.any()):
            metrics[f"ppl/{name}_on_path_mean"] = float(torch.exp(-lp_mean.detach().double()[on_path]).mean())
    return metrics


# --------------------------------------------------------------------------------------------
# per-micro-batch loss
# --------------------------------------------------------------------------------------------


@dataclass
class ObjectiveOutput:
    """Result of :func:`objective_loss` for one micro-batch."""

    loss: torch.Tensor  # scalar fp32 with grad: this micro-batch's additive share of the step loss
    num_tokens: torch.Tensor  # int64 scalar: response tokens in this micro-batch
    metrics: dict[str, torch.Tensor]  # detached fp32 scalars, additive over micro-batches / DP ranks

    def megatron_loss_tuple(self, denominators: GlobalDenominators) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss * D, num_tokens, metrics)`` for megatron's ``calculate_per_token_loss=True`` schedule.

        ``D`` = global response tokens; megatron divides by the sum of ``num_tokens`` over
        micro-batches and DP ranks, which is ``D``, so the optimised quantity is exactly the sum of
        the per-micro-batch ``loss`` values.
        """
        return self.loss * float(denominators.response_tokens), self.num_tokens, self.metrics


def _policy_gradient_loss(ratio: torch.Tensor, advantage: torch.Tensor, clip_eps: float | None) -> torch.Tensor:
    """Per-token ``-rho * A``, or PPO's ``-min(rho A, clip(rho, 1-eps, 1+eps) A)`` with ``clip_eps``."""
    unclipped = ratio * advantage
    if clip_eps is None:
        return -unclipped
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantage
    return -torch.minimum(unclipped, clipped)


def objective_loss(
    config: ObjectiveConfig,
    coefficients: TrajectoryCoefficients,
    denominators: GlobalDenominators,
    *,
    logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    topk_kl: torch.Tensor | None = None,
    token_trajectory: torch.Tensor | None = None,
    check_finite: bool = True,
) -> ObjectiveOutput:
    """The objective on one micro-batch, normalised by the global ``denominators``.

    Per-token tensors share one shape: [B, S] (padded; row b is trajectory b of
    ``coefficients``), or [T] (packed) with ``token_trajectory`` [T] giving each token's row in
    ``coefficients``. Values outside ``response_mask`` are ignored (they may be NaN) and get zero
    gradient.

    Args:
        config: the run's :class:`ObjectiveConfig`.
        coefficients: ``plan.select(rows)`` for this micro-batch's trajectories ([B]).
        denominators: ``plan.denominators`` (global).
        logprobs: current policy log p of the sampled tokens, with gradient (e.g. from
            :func:`~scope_megatron.objective.logprobs.vocab_parallel_logprobs`).
        response_mask: bool, True on response tokens.
        old_logprobs: lp_old (behaviour policy, recomputed by the trainer); None = ``logprobs``
            detached (the single on-policy update: rho = 1 in value).
        teacher_logprobs: lp_T of the sampled tokens (scope, opd, when ``sampled_kl_coef > 0``).
        ref_logprobs: initial-policy log-probs (grpo with ``grpo_kl_beta > 0``).
        rollout_logprobs: the rollout engine's log-probs (the mismatch metrics; the importance
            ratio of ``config.off_policy_correction = "tis"``, which requires them).
        entropy: per-token policy entropy (metric only).
        topk_kl: per-token top-k KL with gradient (when ``config.topk_kl != "none"``).
        check_finite: raise ValueError on NaN/inf at response tokens (one host sync per input).

    Returns:
        :class:`ObjectiveOutput` (loss, local response-token count, additive metrics).
    """
    method = config.method
    shape = tuple(logprobs.shape)
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be floating point, got {logprobs.dtype}")
    if tuple(response_mask.shape) != shape:
        raise ValueError(f"response_mask {tuple(response_mask.shape)} must have the shape of logprobs {shape}")
    mask = _as_bool("response_mask", response_mask)
    inputs = {"old_logprobs": old_logprobs, "teacher_logprobs": teacher_logprobs, "ref_logprobs": ref_logprobs,
              "rollout_logprobs": rollout_logprobs, "entropy": entropy, "topk_kl": topk_kl}
    for name, tensor in inputs.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} must have the shape of logprobs {shape}")

    num_rows = len(coefficients)
    for name in (f.name for f in dataclasses.fields(coefficients)):
        tensor = getattr(coefficients, name)
        if tensor.dim() != 1 or tensor.shape[0] != num_rows:
            raise ValueError(f"coefficients.{name} must be [B] with B = {num_rows}")
    if token_trajectory is None:
        if len(shape) != 2 or shape[0] != num_rows:
            raise ValueError(f"per-token tensors must be [B, S] with B = {num_rows} trajectories (got {shape}); "
                             "for packed [T] tensors pass token_trajectory")

        def per_token(values: torch.Tensor) -> torch.Tensor:
            return values.unsqueeze(1).expand(shape)
    else:
        if tuple(token_trajectory.shape) != shape:
            raise ValueError(f"token_trajectory {tuple(token_trajectory.shape)} must have the shape of logprobs {shape}")
        _require_integer("token_trajectory", token_trajectory)
        if token_trajectory.numel() and bool(((token_trajectory < 0) | (token_trajectory >= num_rows)).any()):
            raise ValueError(f"token_trajectory must index the {num_rows} rows of coefficients")
        rows = token_trajectory.long()

        def per_token(values: torch.Tensor) -> torch.Tensor:
            return values[rows]

    needs_teacher = method in ("scope", "opd") and config.sampled_kl_coef > 0
    if needs_teacher and teacher_logprobs is None:
        raise ValueError(f"teacher_logprobs is required for method {method!r} (sampled-token KL path)")
    needs_topk = method in ("scope", "opd") and config.topk_kl != "none"
    if needs_topk and topk_kl is None:
        raise ValueError(f"topk_kl is required when config.topk_kl = {config.topk_kl!r}")
    if config.off_policy_correction == "tis" and rollout_logprobs is None:
        raise ValueError("rollout_logprobs is required with off_policy_correction='tis'")
    if method == "grpo" and config.grpo_kl_beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required for grpo with grpo_kl_beta > 0")
    if check_finite:
        _require_finite("logprobs", logprobs.detach(), mask)
        for name, tensor in inputs.items():
            if tensor is not None:
                _require_finite(name, tensor.detach(), mask)
        for name, tensor in (("coefficients.mle_weight", coefficients.mle_weight),
                             ("coefficients.kl_weight", coefficients.kl_weight),
                             ("coefficients.advantage", coefficients.advantage)):
            _require_finite(name, tensor)

    f32 = torch.float32
    zero = torch.zeros((), dtype=f32, device=logprobs.device)

    def masked(values: torch.Tensor) -> torch.Tensor:
        # torch.where, not a product: NaN outside the mask must neither leak into the value nor the grad
        return torch.where(mask, values.to(f32), zero)

    lp = masked(logprobs)
    lp_detached = lp.detach()
    lp_old = masked(old_logprobs.detach()) if old_logprobs is not None else lp_detached
    ratio = torch.exp(lp - lp_old)  # rho = pi_theta / pi_old; 1 in value when old_logprobs is None
    div_mle, div_kl, div_all = denominators.divisors(config.aggregation)
    num_tokens = mask.sum()

    mle_sum = kl_sum = policy_sum = zero
    metrics: dict[str, torch.Tensor] = {}
    # truncated importance sampling: the data came from the engine's policy, not lp_old's
    tis = None
    if config.off_policy_correction == "tis":
        assert rollout_logprobs is not None
        raw = torch.exp(lp_old - masked(rollout_logprobs.detach()))
        tis = torch.clamp(raw, max=config.tis_cap)
        metrics["tis/mean_weight"] = torch.where(mask, tis, zero).sum() / div_all
        metrics["tis/truncated_fraction"] = (mask & (raw > config.tis_cap)).sum().to(f32) / div_all

    def corrected(token_loss: torch.Tensor) -> torch.Tensor:
        return token_loss if tis is None else tis * token_loss
    if method in ("scope", "opd", "kd", "sft"):
        w_mle = per_token(coefficients.mle_weight.to(f32))
        w_kl = per_token(coefficients.kl_weight.to(f32))
        # MLE path, Eq. 2: -w_stu * rho (or -w * lp); zero weight off the path.
        if config.effective_mle_form == "ratio":
            mle_token = _policy_gradient_loss(ratio, w_mle, config.clip_eps)
        else:
            mle_token = -w_mle * lp
        mle_sum = torch.where(mask, corrected(mle_token), zero).sum()
        # KL path, Eq. 3: advantage A = -w_tea * sg(lp_old - lp_T); loss -rho * A.
        kl_token = torch.zeros_like(lp)
        if method in ("scope", "opd"):
            if teacher_logprobs is not None:
                log_ratio_teacher = lp_old - masked(teacher_logprobs.detach())  # sampled-token reverse-KL estimate
                if config.sampled_kl_coef > 0:
                    advantage = -w_kl * log_ratio_teacher
                    kl_token = kl_token + config.sampled_kl_coef * _policy_gradient_loss(ratio, advantage, config.clip_eps)
                metrics["kl/sampled_k1"] = log_ratio_teacher.sum() / div_all
                on_kl_tokens = mask & per_token(coefficients.on_kl_path)
                metrics["kl/sampled_k1_kl_path"] = torch.where(on_kl_tokens, log_ratio_teacher, zero).sum() / max(
                    float(denominators.kl_tokens), 1.0)
            if needs_topk:
                assert topk_kl is not None
                kl_token = kl_token + config.topk_kl_coef * w_kl * masked(topk_kl)
        kl_sum = torch.where(mask, corrected(kl_token), zero).sum()
    else:  # grpo
        advantage = per_token(coefficients.advantage.to(f32))
        policy_token = _policy_gradient_loss(ratio, advantage, config.clip_eps)
        if config.grpo_kl_beta > 0:
            assert ref_logprobs is not None
            delta = masked(ref_logprobs.detach()) - lp  # k3 = e^d - d - 1 >= 0, d = lp_ref - lp
            k3 = torch.expm1(delta) - delta
            policy_token = policy_token + config.grpo_kl_beta * k3
            metrics["grpo/k3_ref_kl"] = torch.where(mask, k3, zero).detach().sum() / div_all
        policy_sum = torch.where(mask, corrected(policy_token), zero).sum()

    loss_mle = config.mle_coef * mle_sum / div_mle
    loss_kl = config.kl_coef * kl_sum / div_kl
    loss_policy = policy_sum / div_all
    loss = loss_mle + loss_kl + loss_policy

    metrics["loss/total"] = loss.detach()
    metrics["loss/mle"] = loss_mle.detach()
    metrics["loss/kl"] = loss_kl.detach()
    if method == "grpo":
        metrics["loss/policy"] = loss_policy.detach()
    if config.clip_eps is not None:
        clipped = mask & ((ratio.detach() < 1 - config.clip_eps) | (ratio.detach() > 1 + config.clip_eps))
        metrics["ratio/clipped_fraction"] = clipped.sum().to(f32) / div_all
    if entropy is not None:
        metrics["policy_entropy"] = masked(entropy.detach()).sum() / div_all
    if topk_kl is not None:
        metrics["kl/topk"] = masked(topk_kl.detach()).sum() / div_all
    if rollout_logprobs is not None:
        difference = lp_old - masked(rollout_logprobs.detach())
        metrics["mismatch/train_minus_rollout"] = difference.sum() / div_all
        metrics["mismatch/abs"] = difference.abs().sum() / div_all
    metrics = {key: value.detach().to(f32) for key, value in metrics.items()}
    return ObjectiveOutput(loss=loss, num_tokens=num_tokens.long(), metrics=metrics)
