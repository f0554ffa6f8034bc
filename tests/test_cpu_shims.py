"""The CPU shims are active only without CUDA, and never leak into torch itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROBE = r"""
import json, torch
originals = {n: getattr(torch, n) for n in ("zeros", "empty", "tensor", "arange")}
from scope_megatron.cpu_shims import apply_cpu_shims, shims_active
active = apply_cpu_shims()
from megatron.core.pipeline_parallel import schedules
out = {
    "active": active and shims_active(),
    "torch_untouched": all(getattr(torch, n) is f for n, f in originals.items()),
    "current_device": str(torch.cuda.current_device()),
}
if active:
    out["schedule_counter_device"] = str(schedules.torch.zeros([], dtype=torch.int, device="cuda").device)
    # activation recomputation (megatron's CheckpointFunction) against the plain forward/backward
    from megatron.core.tensor_parallel.random import checkpoint
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    f = lambda t: torch.nn.functional.silu(t @ w) @ w
    f(x).square().sum().backward()
    plain = w.grad.clone()
    w.grad = None
    checkpoint(f, False, x.requires_grad_(True)).square().sum().backward()
    out["recompute_grad_equal"] = torch.equal(w.grad, plain)
print(json.dumps(out))
"""


def _probe() -> dict:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_shims_apply_on_cpu_without_touching_torch():
    out = _probe()
    assert out["active"] and out["torch_untouched"]
    assert out["current_device"] == "cpu"
    assert out["schedule_counter_device"] == "cpu"  # megatron's literal device="cuda" lands on CPU
    assert out["recompute_grad_equal"]  # full recompute runs on CPU and gives the same gradient


@pytest.mark.gpu
def test_shims_never_active_on_gpu():
    out = _probe()
    assert not out["active"] and out["torch_untouched"]
    assert out["current_device"] == "0"
