"""SCOPE routing and group-level trajectory weights (paper Eqs. 4 and 5).

This module is the one place where SCOPE decides how much each rollout counts. It works on
per-trajectory tensors of the GLOBAL batch (all prompts of one rollout step), because the
softmax of Eqs. 4/5 runs over all responses of one prompt, which may be spread over several
micro-batches and data-parallel ranks.

Notation (``docs/method.md`` §2-3):

* group ``x``: the G responses sampled for one prompt (``group_ids`` holds the prompt index);
* routing: ``C = {i in x : correct_i}`` (MLE path), ``W = {i in x : not correct_i}`` (KL path);
* student score  ``s_i = -(1/|y_i|) sum_t lp_old[i,t]``  (= log PPL_S(y_i));
* teacher score  ``q_i = +(1/|y_i|) sum_t lp_T[i,t]``    (= -log PPL_T(y_i));
* Eq. 4: ``w_stu[i] = softmax_{j in C}(s_j / tau)[i]`` -- higher student perplexity, more weight;
* Eq. 5: ``w_tea[i] = softmax_{j in W}(q_j / tau)[i]`` -- higher teacher perplexity, less weight.

The paper's weights sum to 1 inside each (group, path) subset (``normalize="sum1"``); the
reference code multiplies them by the subset size so they average 1 and a subset of one gets
weight 1 (``normalize="mean1"``, the default). ``*_sign="reversed"`` negates a path's score
(the paper's "opposite weight" ablations; the reference scripts' student sign is the reversed
one, ``docs/method.md`` §3); ``*_uniform=True`` gives every member of a subset the same weight (the
"w/o student/teacher weight" and "w/o DPAW" ablations).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Normalization = Literal["mean1", "sum1"]
ScoreSign = Literal["paper", "reversed"]

_NORMALIZATIONS = ("mean1", "sum1")
_SIGNS = ("paper", "reversed")


# --------------------------------------------------------------------------------------------
# input checks shared by this package
# --------------------------------------------------------------------------------------------


def _require_1d(name: str, tensor: torch.Tensor, length: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one value per trajectory), got shape {tuple(tensor.shape)}")
    if length is not None and tensor.shape[0] != length:
        raise ValueError(f"{name} has {tensor.shape[0]} entries but the other per-trajectory inputs have {length}")


def _as_bool(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as bool; integer tensors must hold only 0 and 1."""
    if tensor.dtype == torch.bool:
        return tensor
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {tensor.dtype}")
    if tensor.numel() and not bool(((tensor == 0) | (tensor == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 (or be a bool tensor)")
    return tensor != 0


def _require_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {tensor.dtype}")


def _require_finite(name: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Raise ValueError naming ``name`` if ``values`` (restricted to ``where``) is not finite."""
    bad = ~torch.isfinite(values)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        index = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite value(s) (NaN/inf) where they are used, "
                         f"first at flat index {index}")


def _require_positive_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def sequence_mean_logprob(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean log-prob over the response tokens of each trajectory: ``-log PPL``.

    Args:
        token_logprobs: [B, S] per-token log-probs (any float dtype; positions outside
            ``response_mask`` are ignored, even if NaN).
        response_mask: [B, S] bool, True on response tokens (prompt and padding False).

    Returns:
        [B] float32 (float64 if the input is float64), ``sum_t lp[i,t] / |y_i|``; no gradient.

    Raises:
        ValueError: on mismatched shapes, a response with no tokens (its perplexity is
            undefined: drop it before routing), or NaN/inf on a response token.
    """
    if token_logprobs.shape != response_mask.shape or token_logprobs.dim() != 2:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must both be [B, S]")
    mask = _as_bool("response_mask", response_mask)
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero().flatten()[:8].tolist()
        raise ValueError(f"response_mask: trajectories {empty} have no response tokens; a zero-length "
                         "response has no perplexity (drop it from the batch)")
    _require_finite("token_logprobs", token_logprobs, mask)
    dtype = torch.float64 if token_logprobs.dtype == torch.float64 else torch.float32
    values = torch.where(mask, token_logprobs.detach().to(dtype), torch.zeros((), dtype=dtype))
    return values.sum(dim=1) / lengths.to(dtype)


def subset_index(group_ids: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Index of each trajectory's (group, path) subset: ``(subset [N] long, num_subsets)``."""
    _, group_index = torch.unique(group_ids, return_inverse=True)
    subset = group_index * 2 + correct.long()
    _, subset = torch.unique(subset, return_inverse=True)
    return subset, int(subset.max()) + 1 if subset.numel() else 0


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of ``scores`` [N] inside each segment (``segment`` [N] in ``[0, num_segments)``)."""
    neg_inf = torch.full((num_segments,), -math.inf, dtype=scores.dtype, device=scores.device)
    segment_max = neg_inf.scatter_reduce(0, segment, scores, reduce="amax", include_self=True)
    exp_scores = torch.exp(scores - segment_max[segment])
    segment_sum = torch.zeros(num_segments, dtype=scores.dtype, device=scores.device).index_add_(0, segment, exp_scores)
    return exp_scores / segment_sum[segment]


# --------------------------------------------------------------------------------------------
# Eqs. 4 and 5
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def scope_weights(
    student_logprob_mean: torch.Tensor,
    teacher_logprob_mean: torch.Tensor,
    correct: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    tau: float = 1.0,
    normalize: Normalization = "mean1",
    student_sign: ScoreSign = "paper",
    teacher_sign: ScoreSign = "paper",
    student_uniform: bool = False,
    teacher_uniform: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SCOPE's dual-path trajectory weights (Eqs. 4 and 5), one value per trajectory.

    Args:
        student_logprob_mean: [N] mean response-token log-prob under the student (lp_old),
            e.g. from :func:`sequence_mean_logprob`. Read only on correct trajectories.
        teacher_logprob_mean: [N] the same under the teacher. Read only on incorrect ones.
        correct: [N] bool (or 0/1 ints): routing, True -> MLE path, False -> KL path.
        group_ids: [N] integer prompt id of each trajectory (any values; equal = same group).
        tau: softmax temperature (> 0). tau -> infinity tends to uniform weights.
        normalize: ``"mean1"`` (weights average 1 in each subset; reference code, default) or
            ``"sum1"`` (weights sum to 1 in each subset; the paper's equations).
        student_sign / teacher_sign: ``"paper"`` (Eq. 4 / Eq. 5) or ``"reversed"`` (score negated).
        student_uniform / teacher_uniform: equal weights on that path (ablations).

    Returns:
        ``(w_student, w_teacher)``, each [N] float32 (float64 if both log-prob inputs are float64),
        no gradient. ``w_student`` is 0 on incorrect trajectories and ``w_teacher`` is 0 on
        correct ones. N = 0 gives two empty tensors.

    Raises:
        ValueError / TypeError: on mismatched lengths, wrong dtypes, a bad option, a non-positive
            tau, or NaN/inf in a log-prob mean that a non-uniform path reads.
    """
    _require_1d("student_logprob_mean", student_logprob_mean)
    n = student_logprob_mean.shape[0]
    _require_1d("teacher_logprob_mean", teacher_logprob_mean, n)
    _require_1d("correct", correct, n)
    _require_1d("group_ids", group_ids, n)
    _require_integer("group_ids", group_ids)
    correct = _as_bool("correct", correct)
    _require_positive_finite("tau", tau)
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {_NORMALIZATIONS}, got {normalize!r}")
    for name, sign in (("student_sign", student_sign), ("teacher_sign", teacher_sign)):
        if sign not in _SIGNS:
            raise ValueError(f"{name} must be one of {_SIGNS}, got {sign!r}")
    if not student_uniform:
        _require_finite("student_logprob_mean", student_logprob_mean, correct)
    if not teacher_uniform:
        _require_finite("teacher_logprob_mean", teacher_logprob_mean, ~correct)

    both_double = student_logprob_mean.dtype == torch.float64 and teacher_logprob_mean.dtype == torch.float64
    out_dtype = torch.float64 if both_double else torch.float32
    device = student_logprob_mean.device
    if n == 0:
        empty = torch.zeros(0, dtype=out_dtype, device=device)
        return empty, empty.clone()

    # Scores in float64: the weights are small [N] tensors and exact sums are cheap.
    lp_student = student_logprob_mean.detach().double()
    lp_teacher = teacher_logprob_mean.detach().double()
    # Eq. 4: s_i = -mean lp_S = log PPL_S  ->  w_stu ∝ PPL_S^(1/tau)
    student_score = -lp_student if student_sign == "paper" else lp_student
    # Eq. 5: q_i = +mean lp_T = -log PPL_T  ->  w_tea ∝ PPL_T^(-1/tau)
    teacher_score = lp_teacher if teacher_sign == "paper" else -lp_teacher
    if student_uniform:
        student_score = torch.zeros_like(student_score)
    if teacher_uniform:
        teacher_score = torch.zeros_like(teacher_score)

    # Each trajectory reads its own path's score (the other path's entry may be NaN: unused).
    zero = torch.zeros((), dtype=torch.float64, device=device)
    score = torch.where(correct, student_score, teacher_score)
    subset, num_subsets = subset_index(group_ids, correct)
    weight = segment_softmax(score / tau, subset, num_subsets)  # sums to 1 per subset
    if normalize == "mean1":
        subset_size = torch.bincount(subset, minlength=num_subsets).to(torch.float64)
        weight = weight * subset_size[subset]

    w_student = torch.where(correct, weight, zero).to(out_dtype)
    w_teacher = torch.where(~correct, weight, zero).to(out_dtype)
    return w_student, w_teacher


@torch.no_grad()
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage ``(r_i - mean_g r) / (std_g r + eps)`` per trajectory.

    ``std`` is the unbiased (Bessel) standard deviation of the group, as in verl's GRPO; a group
    of one trajectory, or of equal rewards, gets advantage 0 (no contrast). Returns [N] float32;
    no gradient.
    """
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _require_1d("rewards", rewards)
    _require_1d("group_ids", group_ids, rewards.shape[0])
    _require_integer("group_ids", group_ids)
    _require_finite("rewards", rewards)
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    r = rewards.detach().double()
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    size = torch.bincount(group, minlength=num_groups).double()
    mean = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group, r) / size
    centred = r - mean[group]
    sq = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group, centred * centred)
    std = torch.sqrt(sq / (size - 1).clamp(min=1))
    contrast = (size[group] > 1) & (std[group] > 0)  # groups of one or of equal rewards carry no signal
    advantage = torch.where(contrast, centred / (std[group] + eps), torch.zeros_like(centred))
    return advantage.float()


@torch.no_grad()
def group_outcome_counts(correct: torch.Tensor, group_ids: torch.Tensor) -> dict[str, int]:
    """Number of groups whose responses are all correct, all wrong, or mixed."""
    correct = _as_bool("correct", correct)
    _require_1d("group_ids", group_ids, correct.shape[0])
    if correct.numel() == 0:
        return {"groups": 0, "all_correct": 0, "all_wrong": 0, "mixed": 0}
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1
    size = torch.bincount(group, minlength=num_groups)
    n_correct = torch.bincount(group, weights=correct.double(), minlength=num_groups).long()
    all_correct = int((n_correct == size).sum())
    all_wrong = int((n_correct == 0).sum())
    return {"groups": num_groups, "all_correct": all_correct, "all_wrong": all_wrong,
            "mixed": num_groups - all_correct - all_wrong}


@torch.no_grad()
def subset_weight_entropy(weights: torch.Tensor, members: torch.Tensor, group_ids: torch.Tensor) -> tuple[float, float]:
    """Mean over (group, path) subsets of the entropy of the weights renormalised to sum 1.

    ``members`` [N] bool selects the path's trajectories. Returns ``(mean entropy, mean log |subset|)``;
    the second number is the value uniform weights would give (both 0.0 when no subset exists).
    """
    members = _as_bool("members", members)
    if not bool(members.any()):
        return 0.0, 0.0
    w = weights.detach().double()[members]
    _, subset = torch.unique(group_ids[members], return_inverse=True)
    num = int(subset.max()) + 1
    total = torch.zeros(num, dtype=torch.float64, device=w.device).index_add_(0, subset, w)
    p = w / total[subset]
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    entropy = -torch.zeros(num, dtype=torch.float64, device=w.device).index_add_(0, subset, plogp)
    size = torch.bincount(subset, minlength=num).double()
    return float(entropy.mean()), float(torch.log(size).mean())
