"""The CPU shims are active only without CUDA, and never leak into torch itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROBE = r"""
import json, torch
originals = {n: getattr(torch, n) for n in ("zeros", "empty", "tensor", "arange", "compile")}
from scope_megatron.cpu_shims import apply_cpu_shims, shims_active
active = apply_cpu_shims()
from megatron.core.pipeline_parallel import schedules
out = {
    "active": active and shims_active(),
    "torch_untouched": all(getattr(torch, n) is f for n, f in originals.items()),
    "current_device": str(torch.cuda.current_device()),
}
import sys
from megatron.core import jit
out["compile_deferred"] = "torch._dynamo" not in sys.modules and torch.compile is originals.get("compile", torch.compile) \
    and jit.jit_fuser is not torch.compile
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
    # megatron's import wrapped its fused helpers without importing torch._dynamo; torch.compile is restored
    assert out["compile_deferred"]


def test_torch_compile_deferred_to_the_first_call(monkeypatch):
    from scope_megatron.cpu_shims import _torch_compile_on_first_call

    compiled: list[tuple] = []

    def recording_compile(fn, **options):
        compiled.append((fn, options))
        return lambda *args: ("compiled", fn(*args))

    monkeypatch.setattr(torch, "compile", recording_compile)
    with _torch_compile_on_first_call():
        def double(x):
            return 2 * x
        wrapped = torch.compile(double)
        configured = torch.compile(mode="max-autotune")(double)
    assert torch.compile is recording_compile and compiled == []  # restored; nothing compiled yet
    assert wrapped.__wrapped__ is double and wrapped(3) == ("compiled", 6) and wrapped(4) == ("compiled", 8)
    assert configured(5) == ("compiled", 10)
    assert compiled == [(double, {}), (double, {"mode": "max-autotune"})]  # once each, with its options


@pytest.mark.gpu
def test_shims_never_active_on_gpu():
    out = _probe()
    assert not out["active"] and out["torch_untouched"]
    assert out["current_device"] == "0"
