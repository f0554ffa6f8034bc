"""A GPU node whose GPUs torch cannot use refuses to start instead of training on CPU.

The probes are simulated: a fake ``/dev`` directory, a fake ``nvidia-smi`` on ``PATH`` (printing what
the real one prints for ``-L`` and ``--query-gpu=driver_version``), a fake
``/proc/driver/nvidia/version``, and the environment. The real machine running the tests has no GPU
(CI): the unpatched check must let it run on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scope_megatron import device_check
from scope_megatron.device_check import DeviceMismatchError, check_device, gather_gpu_evidence

REPO = Path(__file__).resolve().parents[1]
SMI_LIST = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000000)\n"
            "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e-aaaa-bbbb-cccc-000000000001)\n")
PROC_VERSION = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
                "GCC version:  gcc version 11.4.0\n")


def _fake_dev(tmp_path: Path, names=("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null")) -> Path:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in names:
        (dev / name).touch()
    return dev


def _fake_smi(tmp_path: Path, driver: str = "535.104.05", fail: bool = False) -> str:
    """A directory holding an ``nvidia-smi``; returns a PATH with it first."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    if fail:
        smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it couldn'\"'\"'t communicate with the "
                       "NVIDIA driver.' >&2\nexit 9\n")
    else:
        listing = SMI_LIST.replace("\n", "\\n")
        smi.write_text(f'#!/bin/sh\ncase "$1" in\n  -L) printf "{listing}";;\n'
                       f'  --query-gpu=driver_version) printf "{driver}\\n{driver}\\n";;\n  *) exit 2;;\nesac\n')
    smi.chmod(0o755)
    return f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin"


def _no_smi_path(tmp_path: Path) -> str:
    empty = tmp_path / "emptybin"
    empty.mkdir(exist_ok=True)
    return str(empty)


def test_evidence_from_device_files_nvidia_smi_and_env(tmp_path):
    env = {"PATH": _fake_smi(tmp_path), "CUDA_VISIBLE_DEVICES": "0,1"}
    found = gather_gpu_evidence(env, dev_dir=_fake_dev(tmp_path), proc_driver_version=tmp_path / "none")
    assert found.device_files == [str(tmp_path / "dev" / "nvidia0"), str(tmp_path / "dev" / "nvidia1")]
    assert found.nvidia_smi_gpus == SMI_LIST.strip().splitlines()
    assert found.cuda_visible_devices == "0,1" and found.driver_version == "535.104.05"
    assert found.gpus_visible


def test_driver_from_proc_when_nvidia_smi_is_absent(tmp_path):
    proc = tmp_path / "version"
    proc.write_text(PROC_VERSION)
    found = gather_gpu_evidence({"PATH": _no_smi_path(tmp_path)}, dev_dir=_fake_dev(tmp_path), proc_driver_version=proc)
    assert found.nvidia_smi_gpus == [] and found.driver_version == "535.104.05" and found.gpus_visible


@pytest.mark.parametrize("probe", ["device_files", "nvidia_smi", "cuda_visible_devices"])
def test_gpu_node_without_usable_cuda_refuses(tmp_path, probe):
    """Each probe alone is enough; the message names torch's CUDA build, the driver and the way out."""
    proc = tmp_path / "version"
    proc.write_text(PROC_VERSION)
    env = {"PATH": _fake_smi(tmp_path) if probe == "nvidia_smi" else _no_smi_path(tmp_path)}
    dev = _fake_dev(tmp_path, () if probe != "device_files" else ("nvidia0", "nvidiactl"))
    if probe == "cuda_visible_devices":
        env["CUDA_VISIBLE_DEVICES"] = "3"
    found = gather_gpu_evidence(env, dev_dir=dev, proc_driver_version=proc)
    with pytest.raises(DeviceMismatchError) as info:
        check_device(env, cuda_available=False, evidence=found)
    msg = str(info.value)
    assert "torch.cuda.is_available() is False" in msg
    assert f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" in msg
    assert "NVIDIA driver: 535.104.05" in msg and "SCOPE_DEVICE=cpu" in msg
    assert {"device_files": "nvidia0", "nvidia_smi": "nvidia-smi lists 2 GPU(s)",
            "cuda_visible_devices": "CUDA_VISIBLE_DEVICES=3"}[probe] in msg
    if torch.version.cuda and torch.version.cuda.startswith("13"):
        assert "needs an NVIDIA driver >= 580" in msg and "this driver (535.104.05) is older" in msg


@pytest.mark.parametrize("env_extra", [{"SCOPE_DEVICE": "cpu"}, {"SCOPE_DEVICE": " CPU "},
                                       {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}])
def test_explicit_cpu_request_runs_on_cpu(tmp_path, env_extra):
    env = {"PATH": _fake_smi(tmp_path), **env_extra}
    found = gather_gpu_evidence(env, dev_dir=_fake_dev(tmp_path), proc_driver_version=tmp_path / "none")
    assert check_device(env, cuda_available=False, evidence=found) == "cpu"


def test_machine_without_gpus_runs_on_cpu(tmp_path):
    env = {"PATH": _fake_smi(tmp_path, fail=True)}  # nvidia-smi installed, no driver: a CPU node
    found = gather_gpu_evidence(env, dev_dir=_fake_dev(tmp_path, ("null", "nvidiactl")),
                                proc_driver_version=tmp_path / "none")
    assert not found.gpus_visible and found.driver_version is None
    assert check_device(env, cuda_available=False, evidence=found) == "cpu"


def test_device_choices(tmp_path):
    none = device_check.GpuEvidence()
    assert check_device({}, cuda_available=True, evidence=none) == "cuda"
    with pytest.raises(DeviceMismatchError, match="SCOPE_DEVICE=cuda"):
        check_device({"SCOPE_DEVICE": "cuda"}, cuda_available=False, evidence=none)
    with pytest.raises(DeviceMismatchError, match="CUDA_VISIBLE_DEVICES="):
        check_device({"SCOPE_DEVICE": "cpu"}, cuda_available=True, evidence=none)
    with pytest.raises(ValueError, match="SCOPE_DEVICE='gpu0': must be one of auto, cpu, cuda"):
        check_device({"SCOPE_DEVICE": "gpu0"}, cuda_available=False, evidence=none)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine without GPUs (CI)")
def test_this_machine_passes_unpatched():
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1") or list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this CPU machine shows GPU traces")
    assert check_device() == "cpu"


PROBE = "import scope_megatron.cpu_shims as s; print('active', s.apply_cpu_shims())"


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU node whose CUDA torch cannot use")
def test_cpu_shims_refuse_on_a_gpu_node_and_obey_scope_device(tmp_path):
    """As a process: the shims are never applied when GPUs are visible, unless SCOPE_DEVICE=cpu."""
    env = {k: v for k, v in os.environ.items() if k not in ("SCOPE_DEVICE", "CUDA_VISIBLE_DEVICES")}
    env.update(PATH=_fake_smi(tmp_path) + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode != 0 and "DeviceMismatchError" in proc.stderr, proc.stderr[-2000:]
    assert "nvidia-smi lists 2 GPU(s)" in proc.stderr and "NVIDIA driver: 535.104.05" in proc.stderr
    assert "active" not in proc.stdout
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**env, "SCOPE_DEVICE": "cpu"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "active True", proc.stderr[-2000:]
