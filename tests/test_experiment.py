"""bench/experiment.py's aggregation: Student-t intervals, pairing by seed, the tables and the figure.

Every expected number is worked by hand in the test (or, for the t table, checked against a
numerical integration of the Student-t density written here from its formula)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_experiment():
    spec = importlib.util.spec_from_file_location("bench_experiment", REPO / "bench" / "experiment.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


exp = _load_experiment()


def _settings(**flags):
    """``settings_from_args`` for the command line with only ``flags`` given (the rest at their defaults)."""
    import argparse

    given = dict(tiny=False, steps=None, prompts=None, group=None, lr=None, eval_problems=None, eval_n=None,
                 eval_every=None, topk_k=None, topk_coef=None)
    return exp.settings_from_args(argparse.Namespace(**{**given, **flags}))


def _t_cdf_above_zero(t: float, df: int, steps: int = 20000) -> float:
    """P(0 < T < t) for Student's t with ``df`` degrees of freedom, by Simpson's rule on its density
    Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + x^2/df)^(-(df+1)/2)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / steps
    total = f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 15, 30])
def test_t_table_is_the_975_quantile(df: int) -> None:
    # the table has three decimals: the density's mass up to t must be 0.475 within that rounding
    t = exp.t_critical_95(df)
    assert _t_cdf_above_zero(t - 0.0006, df) < 0.475 < _t_cdf_above_zero(t + 0.0006, df)


def test_t_known_values_and_large_df() -> None:
    assert exp.t_critical_95(4) == 2.776
    assert exp.t_critical_95(2) == 4.303
    # the expansion beyond the table: 2.021 (df 40), 2.000 (60), 1.980 (120) in the same NIST table
    assert exp.t_critical_95(40) == pytest.approx(2.021, abs=6e-4)
    assert exp.t_critical_95(60) == pytest.approx(2.000, abs=6e-4)
    assert exp.t_critical_95(120) == pytest.approx(1.980, abs=6e-4)
    with pytest.raises(ValueError):
        exp.t_critical_95(0)


def test_t_interval_by_hand() -> None:
    iv = exp.t_interval([0.5, 0.6, 0.7])
    # mean 0.6; deviations -0.1, 0, 0.1 -> variance 0.02 / 2 = 0.01, sd 0.1; half-width 4.303 * 0.1 / sqrt(3)
    assert iv.mean == pytest.approx(0.6)
    assert iv.sd == pytest.approx(0.1)
    assert iv.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert iv.low == pytest.approx(0.6 - 0.248434, abs=1e-6)
    one = exp.t_interval([0.4])
    assert one.mean == 0.4 and one.half_width is None and one.low is None


def test_paired_differences_drop_unpaired_seeds() -> None:
    diffs = exp.paired_differences({0: 0.5, 1: 0.7, 3: 0.9}, {0: 0.4, 1: 0.4, 2: 0.1})
    assert diffs == pytest.approx({0: 0.1, 1: 0.3})


def _row(variant: str, seed: int, before: float | None = None, after: float | None = None,
         error: str | None = None, preset: str | None = None) -> dict:
    row = {"variant": variant, "preset": preset or variant, "group_size": 4, "seed": seed}
    if error is not None:
        row["error"] = error
    else:
        row.update(before=before, after=after, rollout_acc_last5=0.5, curve=[(0, before), (2, after)])
    return row


def test_build_table_intervals_pairing_and_failures() -> None:
    rows = [
        _row("scope", 0, 0.40, 0.50), _row("scope", 1, 0.40, 0.60), _row("scope", 2, 0.40, 0.70),
        # opd: seed 2 failed, seed 3 has no SCOPE partner -> the difference pairs seeds 0 and 1 only
        _row("opd", 0, 0.40, 0.45), _row("opd", 1, 0.40, 0.45), _row("opd", 3, 0.40, 0.90),
        _row("opd", 2, error="RuntimeError: opd failed (exit 1); log: x\nValueError: boom"),
        _row("kd", 0, error="RuntimeError: kd failed (exit 1)\nConfigError: data.solution_key: missing"),
    ]
    table, summary = exp.build_table(rows, ["scope", "opd", "kd", "grpo"], "scope")
    s = summary["scope"]
    assert s["after"]["mean"] == pytest.approx(0.6)
    assert s["after"]["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    # gains 0.1, 0.2, 0.3: the same spread as the after values
    assert s["gain"]["mean"] == pytest.approx(0.2)
    assert s["gain"]["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert "diff_vs_reference" not in s

    o = summary["opd"]
    assert o["seeds"] == [0, 1, 3]
    # differences to SCOPE: seed 0: 0.45 - 0.50 = -0.05, seed 1: 0.45 - 0.60 = -0.15; mean -0.1,
    # sd sqrt(((0.05)^2 + (0.05)^2) / 1) = 0.0707107, half-width 12.706 * 0.0707107 / sqrt(2) = 0.6353
    d = o["diff_vs_reference"]
    assert d["seeds"] == [0, 1]
    assert d["mean"] == pytest.approx(-0.1)
    assert d["sd"] == pytest.approx(math.sqrt(0.005))
    assert d["half_width"] == pytest.approx(12.706 * math.sqrt(0.005) / math.sqrt(2))
    assert o["failed"] == [{"seed": 2, "reason": "ValueError: boom"}]

    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert "(reference)" in lines["scope"]
    assert "60.0% [35.2%, 84.8%]" in lines["scope"]
    assert "-10.0 pp [-73.5, +53.5] (n=2)" in lines["opd"]
    assert "seed 2: ValueError: boom" in lines["opd"]
    # every kd run failed: the row says so with the reason, and grpo, never run, says "not run"
    assert "| failed |" in lines["kd"] and "ConfigError: data.solution_key: missing" in lines["kd"]
    assert "| not run |" in lines["grpo"]


def test_single_seed_has_no_interval() -> None:
    table, summary = exp.build_table([_row("scope", 0, 0.3, 0.4)], ["scope"], "scope")
    assert summary["scope"]["after"]["half_width"] is None
    assert "40.0% (1 seed, no interval)" in table


def test_variants_for_topk_modes() -> None:
    methods = ["scope", "grpo", "kd", "opd_g1"]
    assert [v for v, _, _ in exp.variants_for(methods, "off")] == methods
    assert exp.variants_for(methods, "both") == [
        ("scope", "scope", False), ("grpo", "grpo", False), ("kd", "kd", False), ("opd_g1", "opd_g1", False),
        ("scope+topk", "scope", True), ("opd_g1+topk", "opd_g1", True)]
    assert [v for v, _, _ in exp.variants_for(methods, "on")] == ["grpo", "kd", "scope+topk", "opd_g1+topk"]


def test_mean_curve_and_plot(tmp_path: Path) -> None:
    curves = {0: [(0, 0.2), (5, 0.5)], 1: [(0, 0.4), (5, 0.7)], 2: [(0, 0.3)]}
    points = exp.mean_curve(curves)
    assert [st for st, _ in points] == [0, 5]
    assert points[0][1].mean == pytest.approx(0.3) and points[0][1].n == 3
    assert points[1][1].mean == pytest.approx(0.6) and points[1][1].n == 2
    path = exp.plot_accuracy_by_step({"without top-k KL": {"scope": curves, "grpo": {0: [(0, 0.2), (5, 0.25)]}},
                                      "with top-k KL": {"scope + top-k": {0: [(0, 0.2), (5, 0.8)]}}},
                                     tmp_path / "fig" / "accuracy_by_step.png", teacher_avg=0.9, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    crowded = {f"method {i}": {0: [(0, 0.2), (5, 0.2 + 0.05 * i)]} for i in range(8)}  # legend below the panel
    path = exp.plot_accuracy_by_step({"with top-k KL": crowded}, tmp_path / "crowded.png", teacher_avg=0.9)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_topk_flags_reach_the_scope_config(tmp_path: Path) -> None:
    """The demo's top-k KL spans the tokenizer's whole vocabulary unless ``--topk-k`` narrows it, and
    ``--topk-coef`` becomes ``algorithm.topk_kl_coef`` (left out at the config's default 1)."""
    from scope_megatron.examples import demo
    from scope_megatron.examples.tiny_models import make_tiny_tokenizer

    vocab = len(make_tiny_tokenizer())
    paths = [tmp_path / name for name in ("student", "teacher", "train.jsonl", "test.jsonl", "run")]

    default = _settings()
    algorithm = demo.scope_config(*paths, default)["algorithm"]
    assert algorithm["topk_kl"] == "reverse" and algorithm["topk_k"] == vocab
    assert algorithm.get("topk_kl_coef", 1.0) == default.scope_topk_coef
    assert default.topk_label() == "full-vocabulary"

    narrowed = _settings(topk_k=16, topk_coef=1.0)
    algorithm = demo.scope_config(*paths, narrowed)["algorithm"]
    assert algorithm["topk_k"] == 16 and "topk_kl_coef" not in algorithm
    assert narrowed.topk_label() == "top-16" and narrowed.method_label() == "SCOPE + top-16 reverse KL"

    weighted = _settings(topk_coef=3.0)
    assert demo.scope_config(*paths, weighted)["algorithm"]["topk_kl_coef"] == 3.0


def test_figure_panels_follow_the_tables() -> None:
    """With ``--topk on`` the top-k panel shows GRPO and KD beside the KL-path methods, as its table does."""
    rows = [{"variant": "scope+topk", "seed": 0, "after": 0.4, "curve": [(0, 0.1), (60, 0.4)]},
            {"variant": "grpo", "seed": 0, "after": 0.0, "curve": [(0, 0.1), (60, 0.0)]},
            {"variant": "grpo", "seed": 1, "after": None, "curve": [], "error": "boom"},
            {"variant": "kd", "seed": 0, "after": 0.5, "curve": [(0, 0.1), (60, 0.5)]}]
    labels = {"scope+topk": "scope + KL", "grpo": "grpo", "kd": "kd"}
    variants = exp.variants_for(["scope", "grpo", "kd"], "on")
    plain = [v for v, _, topk in variants if not topk]
    with_topk = [v for v, _, topk in variants if topk]
    panels = exp.figure_panels(rows, labels, plain=[], with_topk=with_topk + plain)
    assert list(panels) == ["with top-k KL"]
    assert panels["with top-k KL"] == {"scope + KL": {0: [(0, 0.1), (60, 0.4)]}, "grpo": {0: [(0, 0.1), (60, 0.0)]},
                                       "kd": {0: [(0, 0.1), (60, 0.5)]}}
    both = exp.figure_panels(rows, labels, plain=["grpo"], with_topk=["scope+topk", "grpo"])
    assert list(both) == ["without top-k KL", "with top-k KL"] and list(both["without top-k KL"]) == ["grpo"]


def test_run_pool_runs_jobs_at_once_and_reports_one_at_a_time() -> None:
    """``--jobs 3``: the first three runs are under way together (a barrier of three that a
    one-at-a-time pool would break by its timeout), every result is reported once, in the calling
    thread, and never two reports overlap; ``--jobs 1`` runs and reports in task order."""
    import threading

    barrier = threading.Barrier(3, timeout=10)
    main_thread = threading.get_ident()
    reported: list[int] = []
    reporting = threading.Lock()

    def work(task: int) -> int:
        if task < 3:
            barrier.wait()  # raises BrokenBarrierError unless tasks 0-2 run at the same time
        return task * 10

    def done(result: int) -> None:
        assert threading.get_ident() == main_thread
        assert reporting.acquire(blocking=False), "two reports at once"
        try:
            reported.append(result)
        finally:
            reporting.release()

    exp.run_pool(list(range(7)), 3, work, done)
    assert sorted(reported) == [0, 10, 20, 30, 40, 50, 60]

    serial: list[int] = []
    exp.run_pool([2, 0, 1], 1, lambda t: t, serial.append)
    assert serial == [2, 0, 1]
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        exp.run_pool([1], 0, lambda t: t, serial.append)


def test_rollout_temperature_method_differs_from_scope_only_in_the_student_temperature(tmp_path: Path) -> None:
    """``scope_rollout_temp`` is SCOPE with ``scale_logits_by_rollout_temperature: true`` (the
    reference code's choice) and nothing else changed; ``scope`` keeps the demo's false."""
    s = _settings()
    task = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}
    models = (tmp_path / "student", tmp_path / "teacher")
    for topk in (False, True):
        scope = exp.method_config("scope", topk, *models, task, tmp_path / "run", s, 3)
        hot = exp.method_config("scope_rollout_temp", topk, *models, task, tmp_path / "run", s, 3)
        assert scope["algorithm"]["scale_logits_by_rollout_temperature"] is False
        assert hot["algorithm"]["scale_logits_by_rollout_temperature"] is True
        hot["algorithm"]["scale_logits_by_rollout_temperature"] = False
        assert hot == scope
        assert (scope["algorithm"]["topk_kl"] == "reverse") is topk
