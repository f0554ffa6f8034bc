"""Assets for a laptop-sized SCOPE run: tiny student and teacher HF models, toy prompts, a toy reward.

``python -m scope_megatron.examples.tiny DIR`` writes ``DIR/student_hf``, ``DIR/teacher_hf`` and
``DIR/prompts.jsonl``, which ``configs/tiny_cpu.yaml`` points at (``runs/tiny``). Untrained tiny
models never write a ``\\boxed{}`` answer, so math-verify would route every rollout to the KL path;
:func:`toy_reward` (``algorithm.reward_function: scope_megatron.examples.tiny:toy_reward``) marks
about half of the responses correct, so both SCOPE paths are exercised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROBLEMS = [("What is 1+1?", "2"), ("What is 2*3?", "6"), ("What is 10-4?", "6"), ("What is 3^2?", "9"),
            ("What is 7+8?", "15"), ("What is 12/4?", "3"), ("What is 5*5?", "25"), ("What is 9-9?", "0")]


def toy_reward(text: str, gold: str, truncated: bool) -> float:
    """1.0 when the response's character codes sum to an even number (deterministic, ~50 %)."""
    return 1.0 if sum(map(ord, text)) % 2 == 0 else 0.0


def write_prompts(path: str | Path, n: int = len(PROBLEMS)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            problem, answer = PROBLEMS[i % len(PROBLEMS)]
            f.write(json.dumps({"id": f"toy-{i}", "problem": problem, "answer": answer}) + "\n")
    return path


def prepare(out_dir: str | Path, family: str = "qwen3") -> dict[str, Path]:
    """Write the tiny student, teacher and prompts under ``out_dir`` (skips what exists)."""
    from .tiny_models import save_tiny_hf_model

    out = Path(out_dir)
    paths = {"student": out / "student_hf", "teacher": out / "teacher_hf", "prompts": out / "prompts.jsonl"}
    if not (paths["student"] / "config.json").is_file():
        save_tiny_hf_model(paths["student"], family, seed=0)
    if not (paths["teacher"] / "config.json").is_file():
        save_tiny_hf_model(paths["teacher"], family, seed=1)
    if not paths["prompts"].is_file():
        write_prompts(paths["prompts"])
    return paths


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny"
    for role, path in prepare(target).items():
        print(f"{role}: {path}")
