"""The SCOPE demo's pieces at reduced size (the full demo is not run in the suite).

- the synthetic task: solutions are correct arithmetic, math-verify grades the boxed answer, the
  held-out benchmark is disjoint from the training problems and loads as an evaluation benchmark;
- ``scope-megatron demo --tiny`` end to end: teacher and student SFT through the loop (cached on
  a second run), SCOPE with embedded engines and in-loop evaluation, the table, the plot, the
  TensorBoard logs and the summary.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from scope_megatron.examples import demo

pytestmark = pytest.mark.timeout(300)


def test_task_solutions_are_correct_and_verifiable(tmp_path):
    from scope_megatron.evaluation.benchmarks import load_benchmark
    from scope_megatron.rollout.rewards import MathRewardPool

    paths = demo.write_task(tmp_path, seed=0, num_test=20)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert len(train) + len(test) == 90 * 90 and len(test) == 20
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for r in train[:200]:
        a, b = map(int, re.match(r"(\d+)\+(\d+)=\?", r["problem"]).groups())
        steps = re.match(r"(\d)\+(\d)=(\d+), (\d)\+(\d)\+(\d)=(\d+), \\boxed\{(\d+)\}$", r["solution"]).groups()
        a0, b0, ones, a1, b1, carry, tens, boxed = map(int, steps)
        assert (a0, b0, a1, b1) == (a % 10, b % 10, a // 10, b // 10)
        assert ones == a0 + b0 and carry == ones // 10 and tens == a1 + b1 + carry
        assert boxed == a + b == int(r["answer"])
    assert load_benchmark(paths["test"]).problems[0].answer == test[0]["answer"]
    with MathRewardPool(num_workers=1, timeout_s=10.0) as pool:
        rewards = pool.score([train[0]["solution"], "\\boxed{0}", "no answer"], [train[0]["answer"]] * 3,
                             [False, False, False])
    assert [r.reward for r in rewards] == [1.0, 0.0, 0.0]


def test_plot_and_curves(tmp_path):
    metrics = [{"step": 0, "eval/mean/avg@1": 0.1, "eval/mean/avg@1_se": 0.01}, {"step": 1, "reward/accuracy": 0.2},
               {"step": 2, "reward/accuracy": 0.4, "eval/mean/avg@1": 0.5}]
    held, rollout = demo.accuracy_curves(metrics)
    assert held == [(0, 0.1), (2, 0.5)] and rollout == [(1, 0.2), (2, 0.4)]
    assert demo.held_out_errors(metrics) == [0.01, 0.0]
    png = demo.plot_accuracy(metrics, 0.9, tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_demo_end_to_end(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert demo.main(["--tiny", "--run-dir", str(tmp_path / "run"), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "| student before SCOPE |" in out and "| teacher |" in out and "accuracy.png" in out
    run = tmp_path / "run"
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    s = demo.DemoSettings.tiny()
    assert summary["method"] == "SCOPE + full-vocabulary reverse KL" and summary["seed"] == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(summary["held_out_curve_se"]) == len(summary["held_out_curve"])
    config = yaml.safe_load((run / "config.yaml").read_text())  # the resolved config the run saved
    assert config["algorithm"]["topk_kl"] == "reverse" and config["algorithm"]["topk_tail"] is True
    assert config["algorithm"]["scale_logits_by_rollout_temperature"] is False
    assert [step for step, _ in summary["held_out_curve"]] == list(range(0, s.scope_steps + 1))
    trained = [m for m in metrics if "loss/total" in m]
    assert all(m["kl/topk"] >= 0 for m in trained)  # the top-k KL term is computed on every step
    assert len(trained) == s.scope_steps
    assert all(m["rollout/stale_fraction"] == 0.0 for m in trained)  # real weight sync each step
    assert all("sync/probe_max_abs_diff" in m for m in trained)
    assert (run / "eval" / "step_00000000" / "records" / "test.jsonl").is_file()
    # teacher and student are cached: a second run does not train them again
    assert demo.main(["--tiny", "--run-dir", str(tmp_path / "run2"), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.count("cached:") == 2 and "SFT step" not in out
