"""Saved rollouts on disk: the writer behind ``logging.save_rollouts`` and the reader behind
``data.replay``.

One file per step, ``rollouts/step_NNNNNNNN.jsonl``, one JSON object per trajectory: every
:class:`~scope_megatron.rollout.types.Trajectory` field plus ``correct`` (for people reading the
file; the reader recomputes it from ``reward``). Floats are written with Python's shortest
round-trip repr and the masked teacher top-k entries as ``-Infinity``, so a replayed batch holds
exactly the numbers the original step trained on.

A replay trains on the saved batches instead of generating: the rollout log-probs, the teacher's
log-probs and top-k rows and the rewards all come from the file (nothing is rescored), so no
engine runs and a replayed step reproduces the original step's loss when it starts from the same
weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .types import RolloutBatch, Trajectory

_FIELDS = {f.name for f in dataclasses.fields(Trajectory)}
_REQUIRED = {f.name for f in dataclasses.fields(Trajectory)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def rollout_file(directory: str | Path, step: int) -> Path:
    """The file of ``step`` under a rollouts directory."""
    return Path(directory) / f"step_{step:08d}.jsonl"


def write_rollouts(directory: str | Path, batch: RolloutBatch) -> Path:
    """The batch's trajectories to ``directory/step_N.jsonl``, atomically (written, then renamed)."""
    out = rollout_file(directory, batch.step)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".jsonl.partial")
    with partial.open("w") as f:
        for t in batch.trajectories:
            # list fields may be tensor-backed views (the controller's, the receiving ranks'): as lists
            record = {f.name: _plain(getattr(t, f.name)) for f in dataclasses.fields(t)}
            f.write(json.dumps({**record, "correct": t.correct}) + "\n")
    partial.replace(out)
    return out


def _plain(value: Any) -> Any:
    """A JSON-ready value: a tensor-backed list view as the Python list it stands for."""
    return value.tolist() if hasattr(value, "tolist") else value


def resolve_replay_dir(path: str | Path) -> Path:
    """``data.replay`` names a run directory (its ``rollouts/`` is used) or a rollouts directory."""
    path = Path(path)
    return path / "rollouts" if (path / "rollouts").is_dir() else path


def missing_steps(directory: str | Path, first: int, last: int) -> list[int]:
    """The steps in ``first..last`` without a file."""
    return [s for s in range(first, last + 1) if not rollout_file(directory, s).is_file()]


def read_rollouts(directory: str | Path, step: int, *, vocab_size: int, teacher_topk: int) -> RolloutBatch:
    """The saved batch of ``step``; raises ValueError naming the file and line for anything the
    trainer could not train on (missing fields, ids outside the student's ``vocab_size``, teacher
    log-probs or top-k rows that do not match the response, no top-k rows when ``teacher_topk`` > 0)."""
    path = rollout_file(directory, step)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: the replayed run saved no rollouts for step {step}")
    trajectories = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            missing = sorted(_REQUIRED - record.keys())
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)} (not a file written by logging.save_rollouts)")
            t = Trajectory(**{k: v for k, v in record.items() if k in _FIELDS})
            _check(t, where, vocab_size, teacher_topk)
            trajectories.append(t)
    if not trajectories:
        raise ValueError(f"{path} holds no trajectories")
    return RolloutBatch(step=step, trajectories=trajectories)


def _check(t: Trajectory, where: str, vocab_size: int, teacher_topk: int) -> None:
    ids = [*t.prompt_ids, *t.response_ids]
    if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
        raise ValueError(f"{where}: token ids outside the student's vocabulary of {vocab_size} (rollouts of another "
                         f"tokenizer?)")
    if len(t.teacher_logprobs) != len(t.response_ids):
        raise ValueError(f"{where}: {len(t.teacher_logprobs)} teacher log-probs for {len(t.response_ids)} response "
                         f"tokens")
    if t.rollout_logprobs and len(t.rollout_logprobs) != len(t.response_ids):
        raise ValueError(f"{where}: {len(t.rollout_logprobs)} rollout log-probs for {len(t.response_ids)} response "
                         f"tokens")
    if teacher_topk and t.response_ids:
        rows = t.teacher_topk_ids
        if len(rows) != len(t.response_ids) or any(len(r) != teacher_topk for r in rows):
            raise ValueError(f"{where}: algorithm.topk_kl needs {teacher_topk} teacher top-k ids per response token "
                             f"(algorithm.topk_k); the file has {len(rows)} rows of {len(rows[0]) if rows else 0} "
                             f"(saved by a run with another topk_k, or without topk_kl)")
        if [len(r) for r in t.teacher_topk_logprobs] != [len(r) for r in rows]:
            raise ValueError(f"{where}: the teacher top-k log-probs do not match its top-k ids row for row")
        if any(not 0 <= i < vocab_size for row in rows for i in row):
            raise ValueError(f"{where}: teacher top-k ids outside the student's vocabulary of {vocab_size}")
