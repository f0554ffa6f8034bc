"""Configuration errors found during setup exit 2 with one line naming the field (docs/training.md's
exit-status contract), run as a user runs the trainer; the conversion tools report bad input in one
line with exit 2 but let an internal ``ValueError`` through with its traceback; fields that cannot
work are refused at config time."""

from __future__ import annotations

import argparse

import pytest

from scope_megatron.config import ConfigError, load_config
from tests.loop_utils import run_train


def _assert_one_line_config_error(proc, field: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("scope-megatron train:")]
    assert len(lines) == 1 and f"config field {field!r}" in lines[0], proc.stderr[-3000:]


def test_world_size_mismatch_exits_2_with_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "x", "problem": "1+1=?", "answer": "2"}\n')
    proc = run_train(f"run_dir={tmp_path / 'run'}", f"model.student={tmp_path / 'none'}", f"data.paths=[{data}]",
                     "algorithm.preset=sft", "teacher.model=", "parallel.tp=2", timeout=180)
    _assert_one_line_config_error(proc, "parallel")


def test_missing_student_exits_2_with_one_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "x", "problem": "1+1=?", "answer": "2", "solution": "2"}\n')
    (tmp_path / "empty").mkdir()
    proc = run_train(f"run_dir={tmp_path / 'run'}", f"model.student={tmp_path / 'empty'}", f"data.paths=[{data}]",
                     "algorithm.preset=sft", "teacher.model=", timeout=180)
    _assert_one_line_config_error(proc, "model.student")
    assert "neither a converted checkpoint" in proc.stderr


def test_grpo_kl_to_initial_policy_is_grpo_only():
    base = ["run_dir=x", "model.student=m", "data.paths=[d.jsonl]", "teacher.model=t", "algorithm.preset=grpo"]
    assert load_config(None, base).objective_config().grpo_kl_beta == 1e-4  # the paper's baseline
    assert load_config(None, base + ["algorithm.grpo_kl_beta=0"]).objective_config().grpo_kl_beta == 0.0
    with pytest.raises(ConfigError, match="algorithm.grpo_kl_beta.*not of 'scope'"):
        load_config(None, base + ["algorithm.preset=scope", "algorithm.grpo_kl_beta=1e-4"])


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="tool")


def test_conversion_tool_input_error_exits_2_internal_value_error_propagates(tmp_path, capsys):
    from checkpoints_tools._cli import InputError, reading_input, run_tool
    from scope_megatron.model.arch import load_hf_config

    (tmp_path / "config.json").write_text("{not json")

    def bad_input(args):
        with reading_input():  # the user's config.json is not JSON: load_hf_config's ValueError
            load_hf_config(tmp_path)
        return {}

    assert run_tool("tool", bad_input, _parser(), []) == 2
    err = capsys.readouterr().err
    assert "tool: error:" in err and "is not valid JSON" in err and "Traceback" not in err

    def raises_input_error(args):
        raise InputError("no such layout")

    assert run_tool("tool", raises_input_error, _parser(), []) == 2

    def internal_bug(args):
        raise ValueError("an internal shape mismatch")

    with pytest.raises(ValueError, match="internal shape mismatch"):  # a bug keeps its traceback (exit 1)
        run_tool("tool", internal_bug, _parser(), [])
