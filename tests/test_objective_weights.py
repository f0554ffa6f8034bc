"""SCOPE routing and group weights (Eqs. 4/5): the paper's Figure 2 example, hand-computed
references, hypothesis properties, GRPO advantages and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_megatron.objective import (
    group_outcome_counts,
    grpo_advantages,
    scope_weights,
    sequence_mean_logprob,
    subset_weight_entropy,
)

SETTINGS = settings(max_examples=60, deadline=None)


def _weights(lp_student, lp_teacher, correct, groups, **kwargs):
    return scope_weights(torch.tensor(lp_student, dtype=torch.float64), torch.tensor(lp_teacher, dtype=torch.float64),
                         torch.tensor(correct), torch.tensor(groups), **kwargs)


# ------------------------------------------------------------------------------------------
# the paper's Figure 2 example
# ------------------------------------------------------------------------------------------


def test_figure2_student_and_teacher_weights():
    """Student PPL {1.2, 2.6, 3.8} -> {0.158, 0.342, 0.500}; teacher PPL {4.5, 2.9, 1.7} -> {0.192, 0.298, 0.510}."""
    student_ppl = [1.2, 2.6, 3.8]
    teacher_ppl = [4.5, 2.9, 1.7]
    lp_student = [-math.log(p) for p in student_ppl] + [0.0] * 3
    lp_teacher = [0.0] * 3 + [-math.log(p) for p in teacher_ppl]
    w_s, w_t = _weights(lp_student, lp_teacher, [True] * 3 + [False] * 3, [7] * 6, normalize="sum1", tau=1.0)
    assert w_s.tolist()[3:] == [0.0, 0.0, 0.0] and w_t.tolist()[:3] == [0.0, 0.0, 0.0]
    # the paper prints 3 decimals (its 0.510 is 0.50915 exactly): agree to within one unit of the last digit
    torch.testing.assert_close(w_s[:3], torch.tensor([0.158, 0.342, 0.500], dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(w_t[3:], torch.tensor([0.192, 0.298, 0.510], dtype=torch.float64), rtol=0, atol=1e-3)
    # and exactly the closed forms PPL_S / sum PPL_S and (1/PPL_T) / sum (1/PPL_T)
    torch.testing.assert_close(w_s[:3], torch.tensor([p / sum(student_ppl) for p in student_ppl], dtype=torch.float64))
    inverse = [1 / p for p in teacher_ppl]
    torch.testing.assert_close(w_t[3:], torch.tensor([v / sum(inverse) for v in inverse], dtype=torch.float64))
    # mean1 (default) is sum1 times the subset size
    m_s, m_t = _weights(lp_student, lp_teacher, [True] * 3 + [False] * 3, [7] * 6)
    torch.testing.assert_close(m_s, 3 * w_s)
    torch.testing.assert_close(m_t, 3 * w_t)


def test_reversed_signs_and_uniform_ablations():
    ppl = [1.2, 2.6, 3.8]
    lp = [-math.log(p) for p in ppl]
    w_s, _ = _weights(lp, lp, [True] * 3, [0] * 3, normalize="sum1", student_sign="reversed")
    inverse = [1 / p for p in ppl]
    expected = [v / sum(inverse) for v in inverse]  # reversed: proportional to 1 / PPL
    torch.testing.assert_close(w_s, torch.tensor(expected, dtype=torch.float64))
    _, w_t = _weights(lp, lp, [False] * 3, [0] * 3, normalize="sum1", teacher_sign="reversed")
    torch.testing.assert_close(w_t, torch.tensor([p / sum(ppl) for p in ppl], dtype=torch.float64))
    w_s, w_t = _weights(lp * 2, lp * 2, [True] * 3 + [False] * 3, [0] * 6, student_uniform=True, teacher_uniform=True)
    assert w_s.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert w_t.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_tau_sharpens_against_hand_formula():
    lp = [-0.1, -0.5, -1.5]
    for tau in (0.5, 2.0):
        w_s, _ = _weights(lp, lp, [True] * 3, [0] * 3, tau=tau, normalize="sum1")
        powered = [math.exp(-v) ** (1 / tau) for v in lp]  # PPL^(1/tau)
        torch.testing.assert_close(w_s, torch.tensor([p / sum(powered) for p in powered], dtype=torch.float64))


def test_groups_are_independent_and_output_dtype():
    lp_s = torch.tensor([-1.0, -2.0, -1.0, -2.0])
    w_s, w_t = scope_weights(lp_s, lp_s, torch.tensor([1, 1, 1, 0]), torch.tensor([5, 5, 9, 9]))
    assert w_s.dtype == torch.float32 and w_t.dtype == torch.float32
    e1, e2 = math.exp(1.0), math.exp(2.0)
    torch.testing.assert_close(w_s, torch.tensor([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2), 1.0, 0.0]))
    torch.testing.assert_close(w_t, torch.tensor([0.0, 0.0, 0.0, 1.0]))


# ------------------------------------------------------------------------------------------
# hypothesis properties
# ------------------------------------------------------------------------------------------


@st.composite
def batches(draw, max_n: int = 20):
    n = draw(st.integers(1, max_n))
    groups = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    correct = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    lp_s = draw(st.lists(st.floats(-8.0, 0.0), min_size=n, max_size=n))
    lp_t = draw(st.lists(st.floats(-8.0, 0.0), min_size=n, max_size=n))
    return (torch.tensor(lp_s, dtype=torch.float64), torch.tensor(lp_t, dtype=torch.float64),
            torch.tensor(correct), torch.tensor(groups))


@SETTINGS
@given(batches(), st.sampled_from(["mean1", "sum1"]), st.floats(0.2, 5.0))
def test_property_nonnegative_exact_subset_sums_and_routing(batch, normalize, tau):
    lp_s, lp_t, correct, groups = batch
    w_s, w_t = scope_weights(lp_s, lp_t, correct, groups, tau=tau, normalize=normalize)
    assert bool((w_s >= 0).all()) and bool((w_t >= 0).all())
    assert bool((w_s[~correct] == 0).all()) and bool((w_t[correct] == 0).all())
    for g in groups.unique():
        for path, weights in ((correct, w_s), (~correct, w_t)):
            members = (groups == g) & path
            if members.any():
                target = 1.0 if normalize == "sum1" else float(members.sum())
                assert abs(float(weights[members].sum()) - target) < 1e-9
                assert bool((weights[members] > 0).all())


@SETTINGS
@given(batches(), st.randoms(use_true_random=False))
def test_property_permutation_invariance(batch, rng):
    lp_s, lp_t, correct, groups = batch
    w_s, w_t = scope_weights(lp_s, lp_t, correct, groups)
    perm = list(range(len(groups)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    p_s, p_t = scope_weights(lp_s[perm], lp_t[perm], correct[perm], groups[perm])
    torch.testing.assert_close(p_s, w_s[perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(p_t, w_t[perm], rtol=0, atol=1e-12)


@SETTINGS
@given(batches())
def test_property_singleton_subset_gets_weight_one(batch):
    lp_s, lp_t, correct, groups = batch
    for normalize in ("mean1", "sum1"):
        w_s, w_t = scope_weights(lp_s, lp_t, correct, groups, normalize=normalize)
        for i in range(len(groups)):
            same_subset = (groups == groups[i]) & (correct == correct[i])
            if int(same_subset.sum()) == 1:
                assert float((w_s if correct[i] else w_t)[i]) == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(batches())
def test_property_large_tau_tends_to_uniform(batch):
    lp_s, lp_t, correct, groups = batch
    w_s, w_t = scope_weights(lp_s, lp_t, correct, groups, tau=1e7)
    uniform_s, uniform_t = scope_weights(lp_s, lp_t, correct, groups, student_uniform=True, teacher_uniform=True)
    torch.testing.assert_close(w_s, uniform_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(w_t, uniform_t, rtol=0, atol=1e-5)


@SETTINGS
@given(batches())
def test_property_weight_order_follows_perplexity(batch):
    """Eq. 4: higher student PPL -> more weight; Eq. 5: higher teacher PPL -> less weight."""
    lp_s, lp_t, correct, groups = batch
    w_s, w_t = scope_weights(lp_s, lp_t, correct, groups)
    r_s, r_t = scope_weights(lp_s, lp_t, correct, groups, student_sign="reversed", teacher_sign="reversed")
    for i in range(len(groups)):
        for j in range(len(groups)):
            if groups[i] != groups[j] or correct[i] != correct[j]:
                continue
            if correct[i] and lp_s[i] < lp_s[j]:  # i has the higher student PPL
                assert w_s[i] >= w_s[j] and r_s[i] <= r_s[j]
            if not correct[i] and lp_t[i] < lp_t[j]:  # i has the higher teacher PPL
                assert w_t[i] <= w_t[j] and r_t[i] >= r_t[j]


@SETTINGS
@given(batches())
def test_property_group_counts_and_entropy_bounds(batch):
    lp_s, lp_t, correct, groups = batch
    counts = group_outcome_counts(correct, groups)
    expected = {"all_correct": 0, "all_wrong": 0, "mixed": 0}
    for g in groups.unique():
        c = correct[groups == g]
        expected["all_correct" if c.all() else "all_wrong" if not c.any() else "mixed"] += 1
    assert counts == {"groups": len(groups.unique()), **expected}
    w_s, _ = scope_weights(lp_s, lp_t, correct, groups)
    entropy, uniform = subset_weight_entropy(w_s, correct, groups)
    assert -1e-12 <= entropy <= uniform + 1e-12


# ------------------------------------------------------------------------------------------
# sequence means, GRPO advantages
# ------------------------------------------------------------------------------------------


def test_sequence_mean_logprob_ignores_padding_even_nan():
    lp = torch.tensor([[-1.0, -3.0, float("nan")], [float("nan"), -2.0, -4.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    torch.testing.assert_close(sequence_mean_logprob(lp, mask), torch.tensor([-2.0, -3.0]))


def test_grpo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = grpo_advantages(rewards, groups, eps=0.0)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0.0, 0.0, 0.0]  # equal rewards -> 0; singleton -> 0
    torch.testing.assert_close(adv, torch.tensor(expected))


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_mismatched_lengths_name_the_argument():
    t3, t4 = torch.zeros(3), torch.zeros(4)
    with pytest.raises(ValueError, match="teacher_logprob_mean"):
        scope_weights(t3, t4, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        scope_weights(t3, t3, torch.ones(3, dtype=torch.bool), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="correct"):
        scope_weights(t3, t3, torch.ones(2, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids"):
        scope_weights(t3, t3, torch.ones(3, dtype=torch.bool), torch.zeros(3))
    with pytest.raises(ValueError, match="correct"):
        scope_weights(t3, t3, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="tau"):
        scope_weights(t3, t3, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long), tau=0.0)
    with pytest.raises(ValueError, match="normalize"):
        scope_weights(t3, t3, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long), normalize="sum")


def test_nonfinite_logprob_means_raise_only_where_used():
    groups = torch.zeros(3, dtype=torch.long)
    correct = torch.tensor([True, True, False])
    lp = torch.tensor([-1.0, -2.0, -1.0])
    with pytest.raises(ValueError, match="student_logprob_mean"):
        scope_weights(torch.tensor([-1.0, float("-inf"), -1.0]), lp, correct, groups)
    with pytest.raises(ValueError, match="teacher_logprob_mean"):
        scope_weights(lp, torch.tensor([-1.0, -1.0, float("nan")]), correct, groups)
    # a NaN on the other path is never read (documented): finite weights
    w_s, w_t = scope_weights(torch.tensor([-1.0, -2.0, float("nan")]), torch.tensor([float("nan"), -1.0, -1.0]),
                             correct, groups)
    assert bool(torch.isfinite(w_s).all() and torch.isfinite(w_t).all())
    # a uniform path does not read its scores at all
    w_s, _ = scope_weights(torch.full((3,), float("nan")), lp, correct, groups, student_uniform=True)
    assert w_s.tolist() == [1.0, 1.0, 0.0]


def test_empty_batch_gives_empty_weights():
    empty = torch.zeros(0)
    w_s, w_t = scope_weights(empty, empty, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert w_s.shape == (0,) and w_t.shape == (0,)


def test_zero_length_response_raises():
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match=r"response_mask: trajectories \[1\]"):
        sequence_mean_logprob(lp, mask)
    with pytest.raises(ValueError, match="token_logprobs"):
        sequence_mean_logprob(torch.tensor([[float("nan"), 0.0, 0.0]] * 2), mask | torch.tensor([[True, False, False]] * 2))
