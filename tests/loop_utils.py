"""Helpers shared by the training-loop tests (tests/test_loop_*.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny_cpu.yaml"


def loop_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        head = [sys.executable]
    return [*head, "-m", "scope_megatron.train", "--config", str(TINY_CONFIG), *overrides]


def run_train(*overrides: str, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m scope_megatron.train`` (torchrun for nproc > 1) with the tiny config, as a user runs it."""
    return subprocess.run(train_cmd(*overrides, nproc=nproc), cwd=REPO, env=loop_env(), capture_output=True,
                          text=True, timeout=timeout)


def asset_overrides(assets: dict[str, Path], run_dir: Path, student: Path | None = None) -> list[str]:
    return [f"run_dir={run_dir}", f"model.student={student or assets['student']}",
            f"teacher.model={assets['teacher']}", f"data.paths=[{assets['prompts']}]"]


def read_metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record
    return out


def tensorboard_tags(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def documented_tags() -> tuple[set[str], set[str]]:
    """Tags listed in docs/training.md's tag table: (always written, written only under a condition)."""
    always, conditional = set(), set()
    text = (REPO / "docs" / "training.md").read_text()
    section = text.split("## TensorBoard tags", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([a-z_0-9/]+)`\s*\|(.*)\|\s*$", line)
        if not m:
            continue
        (conditional if "(only " in m.group(2) else always).add(m.group(1))
    return always, conditional


def hf_logprobs(hf_dir: Path, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
    """log p(response | prompt) per response token with plain transformers (fp32, temperature 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    p = len(prompt_ids)
    return [logp[p - 1 + j, t].item() for j, t in enumerate(response_ids)]


def load_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"rc={proc.returncode}\nSTDERR:\n{proc.stderr[-n:]}\nSTDOUT:\n{proc.stdout[-1000:]}"
