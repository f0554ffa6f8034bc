"""Avg@k / Pass@k against hand-computed values and a brute-force enumeration of k-subsets."""

from __future__ import annotations

import itertools
import math

import pytest

from scope_megatron.evaluation.metrics import (MetricError, aggregate, avg_at_k, benchmark_metrics, check_ks,
                                               mean_over_benchmarks, mean_standard_errors, parse_ks, pass_at_k_bootstrap,
                                               pass_at_k_unbiased, problem_metrics)
from scope_megatron.evaluation.runner import EvalError, EvalSettings, default_ks


# ---------------------------------------------------------------- unbiased Pass@k, by hand
@pytest.mark.parametrize("n,c,k,expected", [
    (4, 0, 1, 0.0),          # c = 0
    (4, 0, 4, 0.0),
    (4, 4, 1, 1.0),          # c = n
    (4, 4, 3, 1.0),
    (4, 1, 1, 0.25),         # k = 1 -> c / n
    (8, 3, 1, 3 / 8),
    (4, 1, 4, 1.0),          # k = n -> 1 as soon as one sample is correct
    (5, 2, 2, 0.7),          # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 1, 2, 0.4),          # 1 - C(4,2)/C(5,2) = 1 - 6/10
    (6, 2, 3, 0.8),          # 1 - C(4,3)/C(6,3) = 1 - 4/20
    (32, 1, 8, 0.25),        # 1 - C(31,8)/C(32,8) = 8/32
])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k_unbiased(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(4, 2, 5), (1, 0, 2), (32, 32, 64)])
def test_k_larger_than_n_is_refused(n, c, k):
    with pytest.raises(MetricError, match=rf"k={k} is larger than the number of samples per problem n={n}"):
        pass_at_k_unbiased(n, c, k)
    with pytest.raises(MetricError, match=rf"k={k}"):
        avg_at_k(n, c, k)
    with pytest.raises(MetricError, match=rf"k={k}"):
        pass_at_k_bootstrap([True] * c + [False] * (n - c), k)


@pytest.mark.parametrize("n,c,k,match", [(4, 5, 1, "in \\[0, n=4\\]"), (4, -1, 1, "c=-1"), (4, 1, 0, "at least 1"),
                                         (0, 0, 1, "at least one sample"), (4, 1.0, 1, "integer")])
def test_bad_counts_are_refused(n, c, k, match):
    with pytest.raises(MetricError, match=match):
        pass_at_k_unbiased(n, c, k)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c correct) that contain a correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_unbiased_matches_enumeration_of_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = brute_force_pass_at_k(n, c, k)
                assert pass_at_k_unbiased(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_unbiased_is_exact_for_large_n():
    # the product form 1 - prod(1 - k / arange(n-c+1, n+1)) of the Codex paper, in exact rationals
    from fractions import Fraction

    n, c, k = 256, 7, 64
    prod = Fraction(1)
    for i in range(n - c + 1, n + 1):
        prod *= 1 - Fraction(k, i)
    assert pass_at_k_unbiased(n, c, k) == pytest.approx(float(1 - prod), abs=1e-15)


# ---------------------------------------------------------------- Avg@k
@pytest.mark.parametrize("n,c,k,expected", [(4, 0, 1, 0.0), (4, 4, 4, 1.0), (4, 3, 1, 0.75), (4, 3, 4, 0.75),
                                            (32, 5, 8, 5 / 32)])
def test_avg_at_k_hand_cases(n, c, k, expected):
    assert avg_at_k(n, c, k) == expected


def test_pass_at_1_equals_avg():
    for n in range(1, 7):
        for c in range(n + 1):
            assert pass_at_k_unbiased(n, c, 1) == pytest.approx(avg_at_k(n, c, 1), abs=1e-15)


# ---------------------------------------------------------------- bootstrap (the reference code's variant)
def test_bootstrap_extremes_and_refusals():
    assert pass_at_k_bootstrap([False] * 8, 8) == 0.0
    assert pass_at_k_bootstrap([True] * 8, 8) == 1.0
    assert pass_at_k_bootstrap([1.0, 0.0, 0.0, 0.0], 1, draws=4000) == pytest.approx(0.25, abs=0.03)
    with pytest.raises(MetricError, match="draws"):
        pass_at_k_bootstrap([True, False], 1, draws=0)


@pytest.mark.parametrize("n,c,k", [(32, 1, 32), (32, 8, 32), (32, 8, 8), (8, 2, 4), (16, 15, 16)])
def test_bootstrap_estimates_sampling_with_replacement(n, c, k):
    # expectation 1 - (1 - c/n)^k; 1000 draws: standard error <= 0.016
    value = pass_at_k_bootstrap([True] * c + [False] * (n - c), k)
    expected = 1 - (1 - c / n) ** k
    stderr = math.sqrt(expected * (1 - expected) / 1000)
    assert abs(value - expected) <= 4 * stderr + 1e-9, (value, expected)
    if 0 < c < n and k == n and expected < 0.99:
        assert value < pass_at_k_unbiased(n, c, k) == 1.0   # lower than the unbiased estimator at k = n


def test_bootstrap_is_seeded():
    scores = [True, False, False, False, False, False, True, False]
    assert pass_at_k_bootstrap(scores, 4) == pass_at_k_bootstrap(scores, 4, seed=42)
    assert pass_at_k_bootstrap(scores, 4, seed=1) != pass_at_k_bootstrap(scores, 4, seed=42)


# ---------------------------------------------------------------- aggregation
def test_problem_metrics_and_macro_average():
    problems = [[True, True, False, False], [False] * 4, [True] * 4]
    per = [problem_metrics(p, [1, 2, 4]) for p in problems]
    assert per[0] == {"avg@1": 0.5, "pass@1": 0.5, "avg@2": 0.5, "pass@2": pytest.approx(1 - 1 / 6),
                      "avg@4": 0.5, "pass@4": 1.0}
    score = benchmark_metrics(problems, [1, 2, 4], name="b")
    assert score.num_problems == 3 and score.num_samples == 12
    assert score.metrics["avg@4"] == pytest.approx(0.5)                      # (0.5 + 0 + 1) / 3
    assert score.metrics["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert score.metrics["pass@4"] == pytest.approx(2 / 3)
    boot = benchmark_metrics(problems, [4], estimator="bootstrap")
    assert boot.metrics["pass@4"] == pytest.approx((pass_at_k_bootstrap(problems[0], 4) + 0 + 1) / 3)
    assert boot.metrics["pass@4"] < score.metrics["pass@4"]
    with pytest.raises(MetricError, match="estimator"):
        problem_metrics(problems[0], [1], estimator="max")
    with pytest.raises(MetricError, match="no scored problems"):
        aggregate([], name="empty")


def test_mean_over_benchmarks_is_unweighted():
    big = benchmark_metrics([[True]] * 3 + [[False]], [1], name="big")     # 0.75 over 4 problems
    small = benchmark_metrics([[False]], [1], name="small")                # 0.0 over 1 problem
    assert mean_over_benchmarks([big, small]) == {"avg@1": 0.375, "pass@1": 0.375}


def test_standard_error_over_problems_hand_worked():
    # per-problem Avg@1: 1, 0, 0.5 -> mean 0.5, sample sd sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    score = benchmark_metrics([[True, True], [False, False], [True, False]], [1, 2], name="b")
    assert score.metrics["avg@1"] == pytest.approx(0.5)
    assert score.standard_errors["avg@1"] == pytest.approx(0.5 / math.sqrt(3))
    # Pass@2 per problem: 1, 0, 1 -> sd sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3)
    assert score.standard_errors["pass@2"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    one = benchmark_metrics([[True, False]], [1], name="one")
    assert one.standard_errors["avg@1"] == 0.0
    other = benchmark_metrics([[True], [False]], [1], name="other")  # sd sqrt(0.5) -> se 0.5
    assert other.standard_errors["avg@1"] == pytest.approx(0.5)
    # the mean over two benchmarks: sqrt(se1^2 + se2^2) / 2
    both = mean_standard_errors([benchmark_metrics([[True, True], [False, False], [True, False]], [1]), other])
    assert both["avg@1"] == pytest.approx(math.sqrt(0.25 / 3 + 0.25) / 2)


def test_parse_and_check_ks():
    assert parse_ks("32,1, 8,8") == [1, 8, 32]
    assert parse_ks([4, 2]) == [2, 4]
    for bad in ("1,x", "0", "", "-3"):
        with pytest.raises(MetricError):
            parse_ks(bad)
    check_ks([1, 4], 4)
    with pytest.raises(MetricError, match="k=8"):
        check_ks([1, 8], 4)
    assert default_ks(32) == (1, 8, 32) and default_ks(4) == (1, 4) and default_ks(1) == (1,)


def test_settings_refuse_k_above_n_before_sampling():
    with pytest.raises(MetricError, match="k=8 is larger than the number of samples per problem n=4"):
        EvalSettings(n=4, ks=(1, 8))
    with pytest.raises(EvalError, match="top_p must be in"):
        EvalSettings(n=4, ks=(1,), top_p=0.0)
    s = EvalSettings()
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.n) == (0.6, 0.95, 20, 32768, 32)
    assert s.prompt_format.suffix == "Put your final answer within \\boxed{}."
