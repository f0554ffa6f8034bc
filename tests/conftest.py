"""Shared fixtures: tiny HF models of each family, converted once per test session with the real tool;
the tiny student, teacher and prompts of ``configs/tiny_cpu.yaml``, written once per session."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (case name, family, config overrides)
MODEL_CASES = [
    ("llama", "llama", {}),
    ("qwen2", "qwen2", {}),
    ("qwen3", "qwen3", {}),
    ("qwen3_tied", "qwen3", {"tie_word_embeddings": True}),
]


def run_module(module: str, *args: str, timeout: float = 300, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (or torchrun with ``nproc`` ranks) as a user would; capture output."""
    from checkpoints_tools._cli import tool_command

    cmd, env = tool_command(module, *args, nproc=nproc)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def converted_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{case: (hf_dir, megatron_ckpt_dir)} for every case in MODEL_CASES, converted by hf_to_megatron."""
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("models")
    out = {}
    for seed, (name, family, overrides) in enumerate(MODEL_CASES):
        out[name] = (save_tiny_hf_model(root / f"{name}_hf", family, seed=seed, **overrides), root / f"{name}_ckpt")

    def convert(name: str) -> subprocess.CompletedProcess:
        hf_dir, ckpt = out[name]
        return run_module("checkpoints_tools.hf_to_megatron", "--hf", str(hf_dir), "--out", str(ckpt))

    # each conversion is one single-threaded process, mostly interpreter start-up and imports:
    # two at a time keep both cores of a small CI machine busy
    with ThreadPoolExecutor(2) as pool:
        for name, proc in zip(out, pool.map(convert, list(out))):
            assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    return out


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is absent (they run on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _tiny_asset_paths(tmp_path_factory) -> dict[str, Path]:
    from scope_megatron.examples.tiny import prepare

    return prepare(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def assets(_tiny_asset_paths) -> dict[str, Path]:
    """{"student", "teacher", "prompts"}: the tiny HF student and teacher and the toy prompts
    (shared by the session: read them, never write into them); a module may add keys to its copy."""
    return dict(_tiny_asset_paths)
