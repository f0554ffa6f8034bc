"""Evaluation: Avg@k / Pass@k on math benchmarks (``scope-megatron eval``) and in-training eval.

- :mod:`.metrics`: Avg@k, unbiased and bootstrap Pass@k, per-benchmark aggregation.
- :mod:`.benchmarks`: loading and validating ``{"id", "problem", "answer", "source"}`` jsonl files.
- :mod:`.runner`: sampling from an SGLang-protocol server, grading, resumable per-problem records,
  ``results.json`` / ``results.md``; :func:`~.runner.evaluate` for the trainer.
- :mod:`.cli`: the ``scope-megatron eval`` command.
"""

from .benchmarks import Benchmark, BenchmarkFormatError, Problem, load_benchmark, load_benchmarks
from .metrics import MetricError, avg_at_k, pass_at_k_bootstrap, pass_at_k_unbiased
from .runner import EvalError, EvalResult, EvalSettings, evaluate, run_evaluation, run_evaluation_async

__all__ = [
    "Benchmark", "BenchmarkFormatError", "Problem", "load_benchmark", "load_benchmarks",
    "MetricError", "avg_at_k", "pass_at_k_bootstrap", "pass_at_k_unbiased",
    "EvalError", "EvalResult", "EvalSettings", "evaluate", "run_evaluation", "run_evaluation_async",
]
