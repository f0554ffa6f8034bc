"""math-verify rewards on the last \\boxed{} in a process pool with per-item timeouts."""

from __future__ import annotations

import os
import time

import pytest

from scope_megatron.rollout.rewards import MathRewardPool, last_boxed_content

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"nested \boxed{a^{b^{c}}} end", "a^{b^{c}}"),
    (r"$\boxed 7$", "7"),
    (r"\fbox{3}", "3"),
    ("no box here", None),
    (r"unclosed \boxed{12", None),
    (r"\boxed{} empty", ""),
])
def test_last_boxed_content(text, expected):
    assert last_boxed_content(text) == expected


def test_boxed_scanner_is_linear_on_deep_nesting():
    text = r"\boxed{" + "{" * 200_000 + "1" + "}" * 200_000 + "}"
    t0 = time.monotonic()
    assert last_boxed_content(text) == "{" * 200_000 + "1" + "}" * 200_000
    assert time.monotonic() - t0 < 2.0


@pytest.fixture(scope="module")
def pool():
    with MathRewardPool(num_workers=2, timeout_s=8.0) as p:
        yield p


def test_hand_worked_cases(pool):
    cases = [  # (response, gold, reward)
        (r"The answer is \boxed{\frac{1}{2}}.", "0.5", 1.0),           # fraction vs decimal
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),                          # latex vs plain
        (r"\boxed{25}", "025", 1.0),                                    # zero-padded AIME gold
        (r"\boxed{\sqrt{2}}", "2^{1/2}", 1.0),
        (r"\boxed{x^2+1}", "1+x^2", 1.0),
        (r"\boxed{3}", "4", 0.0),                                       # wrong
        (r"\boxed{5} ... no wait \boxed{6}", "5", 0.0),                 # only the last box counts
        (r"\boxed{5} ... no wait \boxed{6}", "6", 1.0),
        ("The answer is 42.", "42", 0.0),                               # no \boxed{}
    ]
    results = pool.score([c[0] for c in cases], [c[1] for c in cases])
    assert [r.reward for r in results] == [c[2] for c in cases], [(r.status, r.extracted) for r in results]
    assert results[-1].status == "no_answer"
    assert results[6].status == "wrong"


def test_truncated_is_incorrect_even_when_right(pool):
    results = pool.score([r"\boxed{7}", r"\boxed{7}"], ["7", "7"], truncated=[True, False])
    assert [(r.reward, r.status) for r in results] == [(0.0, "truncated"), (1.0, "correct")]


def test_pathological_inputs_finish_within_timeout_with_zero(pool):
    huge = "9" * 10_000
    nested = r"\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}"
    responses = [rf"\boxed{{{huge}}}", nested, r"\boxed{\frac{\frac{\frac{1}{}}}}", rf"\boxed{{{huge}^{{{huge}}}}}"]
    t0 = time.monotonic()
    results = pool.score(responses, ["5", "2", "1", "3"])
    elapsed = time.monotonic() - t0
    assert [r.reward for r in results] == [0.0] * 4
    assert elapsed < 4 * 8.0 + 10  # each item is bounded by the per-item timeout
    # the pool still works afterwards
    assert pool.score([r"\boxed{2}"], ["2"])[0].reward == 1.0


def sleepy_verify(predicted: str, gold: str, timeout_s: int) -> bool:
    """A verifier that hangs on "hang" and kills its process on "crash"."""
    if predicted == "hang":
        time.sleep(60)
    if predicted == "crash":
        os._exit(3)
    if predicted == "raise":
        raise RecursionError("too deep")
    return predicted == gold


def test_timeouts_crashes_and_errors_are_counted_and_survived():
    with MathRewardPool(num_workers=2, timeout_s=1.5, verify_fn=sleepy_verify) as pool:
        t0 = time.monotonic()
        results = pool.score([r"\boxed{hang}", r"\boxed{crash}", r"\boxed{raise}", r"\boxed{1}", r"\boxed{2}", "none"],
                             ["x", "x", "x", "1", "1", "1"])
        assert time.monotonic() - t0 < 15
        assert [r.status for r in results] == ["timeout", "crash", "error", "correct", "wrong", "no_answer"]
        assert [r.reward for r in results] == [0, 0, 0, 1, 0, 0]
        assert "RecursionError" in results[2].detail
        counts = pool.stats.as_dict()
        assert counts["timeout"] == counts["crash"] == counts["error"] == counts["correct"] == 1
        assert pool.score([r"\boxed{1}"], ["1"])[0].reward == 1.0  # replacements work


def test_length_mismatch_is_an_error(pool):
    with pytest.raises(ValueError, match="gold"):
        pool.score(["a"], [])
