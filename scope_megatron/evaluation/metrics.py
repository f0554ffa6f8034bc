"""Avg@k and Pass@k from n scored samples per problem, and their per-benchmark aggregation.

Definitions (``docs/method.md`` §6):

- **Avg@k**: the mean accuracy over k samples of a problem. From ``n >= k`` samples its unbiased
  estimate is ``c / n`` (every sample is used; the value does not depend on k). The reference
  code computes it the same way ("the mean score over all N candidates").
- **Pass@k, unbiased** (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``, the probability that a
  k-subset drawn without replacement from the n samples holds at least one correct one.
  Computed exactly with integer binomials.
- **Pass@k, bootstrap** (the reference code's ``scripts/eval/eval_benchmark.py``): ``draws``
  (1,000) draws of k indices *with replacement* from the n samples, the max score of each
  draw, averaged; seed 42. Its expectation is ``1 - (1 - c/n)^k``, lower than the unbiased
  value: at k = n the unbiased estimator is 1 whenever c >= 1, the bootstrap about
  ``1 - (1 - c/n)^n``. Here the generator is ``numpy.random.RandomState(seed)`` created per
  problem, so a problem's value does not depend on which other problems were evaluated.

Both estimators refuse k > n (there are not k samples to choose from) and k < 1.
Per-benchmark numbers are macro averages over problems; the cross-benchmark mean is the
unweighted mean of the benchmark numbers, as in the paper's "Avg" column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

ESTIMATORS = ("unbiased", "bootstrap")
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 42

ESTIMATOR_DESCRIPTIONS = {
    "unbiased": "unbiased estimator 1 - C(n-c,k)/C(n,k) (Chen et al. 2021)",
    "bootstrap": "bootstrap with replacement as in the reference code ({draws} draws of k of the n samples, "
                 "max per draw, mean; seed {seed}); lower than the unbiased estimator, especially at k = n",
}


class MetricError(ValueError):
    """Bad input to a metric (k > n, k < 1, c outside [0, n], ...); the message says which."""


def _check_counts(n: int, c: int, k: int) -> None:
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise MetricError(f"{name} must be an integer, got {value!r}")
    if n < 1:
        raise MetricError(f"need at least one sample per problem, got n={n}")
    if not 0 <= c <= n:
        raise MetricError(f"the number of correct samples must be in [0, n={n}], got c={c}")
    if k < 1:
        raise MetricError(f"k must be at least 1, got k={k}")
    if k > n:
        raise MetricError(f"k={k} is larger than the number of samples per problem n={n}: Pass@{k} and "
                          f"Avg@{k} need at least {k} samples per problem (sample more with a larger n, or drop k={k})")


def pass_at_k_unbiased(n: int, c: int, k: int) -> float:
    """``1 - C(n-c, k) / C(n, k)`` for ``c`` correct of ``n`` samples (exact integer binomials)."""
    _check_counts(n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def avg_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Avg@k estimate from ``c`` correct of ``n >= k`` samples: ``c / n``."""
    _check_counts(n, c, k)
    return c / n


def pass_at_k_bootstrap(correct: Sequence[bool] | Sequence[float], k: int, draws: int = BOOTSTRAP_DRAWS,
                        seed: int = BOOTSTRAP_SEED) -> float:
    """The reference code's bootstrap Pass@k: mean over ``draws`` draws (``numpy.random.RandomState(seed)``,
    ``choice(n, k, replace=True)`` each) of the max score of the drawn samples."""
    scores = np.asarray([float(x) for x in correct], dtype=np.float64)
    _check_counts(len(scores), int(np.sum(scores > 0.5)), k)
    if draws < 1:
        raise MetricError(f"draws must be at least 1, got {draws}")
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(draws):
        total += float(scores[rng.choice(len(scores), k, replace=True)].max())
    return total / draws


def parse_ks(text: str | Iterable[int]) -> list[int]:
    """``"1,8,32"`` (or an iterable of ints) -> sorted unique positive ints; :class:`MetricError` otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    ks: set[int] = set()
    for item in items:
        try:
            k = int(str(item).strip())
        except ValueError:
            raise MetricError(f"k values must be positive integers separated by commas, got {text!r}") from None
        if k < 1:
            raise MetricError(f"k values must be at least 1, got {k}")
        ks.add(k)
    if not ks:
        raise MetricError("at least one k value is needed")
    return sorted(ks)


def check_ks(ks: Sequence[int], n: int) -> None:
    """Refuse any k > n before sampling starts (the error names the offending k)."""
    for k in ks:
        _check_counts(n, 0, k)


def problem_metrics(correct: Sequence[bool], ks: Sequence[int], estimator: str = "unbiased",
                    draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> dict[str, float]:
    """``{"avg@k": .., "pass@k": ..}`` for every k, for one problem's per-sample correctness."""
    if estimator not in ESTIMATORS:
        raise MetricError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    n = len(correct)
    c = int(sum(1 for x in correct if x))
    out: dict[str, float] = {}
    for k in ks:
        out[f"avg@{k}"] = avg_at_k(n, c, k)
        if estimator == "unbiased":
            out[f"pass@{k}"] = pass_at_k_unbiased(n, c, k)
        else:
            out[f"pass@{k}"] = pass_at_k_bootstrap(correct, k, draws, seed)
    return out


@dataclass
class BenchmarkScore:
    """Macro-averaged metrics of one benchmark (fractions in [0, 1])."""

    name: str
    num_problems: int
    num_samples: int
    metrics: dict[str, float]
    # standard error of each metric over problems: sample sd / sqrt(problems) (0 with one problem);
    # it counts both the sampling noise within a problem and the spread between problems
    standard_errors: dict[str, float] = field(default_factory=dict)


def aggregate(per_problem: Sequence[Mapping[str, float]], name: str = "", num_samples: int = 0) -> BenchmarkScore:
    """Macro average of per-problem metric dicts (all with the same keys)."""
    if not per_problem:
        raise MetricError(f"benchmark {name!r} has no scored problems")
    keys = list(per_problem[0].keys())
    for i, m in enumerate(per_problem):
        if list(m.keys()) != keys:
            raise MetricError(f"benchmark {name!r}: problem {i} has metrics {sorted(m)}, expected {sorted(keys)}")
    metrics = {key: float(np.mean([m[key] for m in per_problem])) for key in keys}
    count = len(per_problem)
    errors = {key: float(np.std([m[key] for m in per_problem], ddof=1) / np.sqrt(count)) if count > 1 else 0.0
              for key in keys}
    return BenchmarkScore(name=name, num_problems=count, num_samples=num_samples, metrics=metrics,
                          standard_errors=errors)


def mean_over_benchmarks(scores: Sequence[BenchmarkScore]) -> dict[str, float]:
    """Unweighted mean of each metric over benchmarks (the paper's "Avg" column)."""
    if not scores:
        return {}
    keys = list(scores[0].metrics.keys())
    return {key: float(np.mean([s.metrics[key] for s in scores])) for key in keys}


def mean_standard_errors(scores: Sequence[BenchmarkScore]) -> dict[str, float]:
    """Standard error of :func:`mean_over_benchmarks`: ``sqrt(sum se_b^2) / B`` (benchmarks independent)."""
    if not scores:
        return {}
    keys = list(scores[0].standard_errors.keys())
    return {key: float(np.sqrt(sum(s.standard_errors[key] ** 2 for s in scores)) / len(scores)) for key in keys}


def benchmark_metrics(correct_lists: Sequence[Sequence[bool]], ks: Sequence[int], estimator: str = "unbiased",
                      name: str = "", draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> BenchmarkScore:
    """Per-problem metrics then their macro average, from each problem's per-sample correctness."""
    per_problem = [problem_metrics(c, ks, estimator, draws, seed) for c in correct_lists]
    return aggregate(per_problem, name=name, num_samples=sum(len(c) for c in correct_lists))
