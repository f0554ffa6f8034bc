"""Refuse to fall back to CPU on a machine whose GPUs torch cannot use.

Without CUDA every entry point runs megatron on CPU over gloo (:mod:`scope_megatron.cpu_shims`).
That is right on a machine without GPUs and wrong on a GPU node where ``torch.cuda.is_available()``
is False because of the environment: a torch wheel built for a newer CUDA than the driver
supports (PyPI's default torch is a CUDA 13 build, which needs an R580 or newer driver), a
container started without ``--gpus``, a broken driver. Such a run would "train" on CPU in float32.

:func:`check_device` looks for GPUs the way an administrator would (``/dev/nvidia<N>`` device
files, ``CUDA_VISIBLE_DEVICES`` naming devices, ``nvidia-smi -L``) and raises
:class:`DeviceMismatchError` naming the torch build and the driver when it finds some that torch
cannot use. The environment variable ``SCOPE_DEVICE`` overrides it:

- ``auto`` (default): CUDA when torch has it; CPU only when no GPU is visible.
- ``cpu``: run on CPU on purpose, whatever GPUs the machine has (refused while torch can use CUDA:
  hide the GPUs with ``CUDA_VISIBLE_DEVICES=`` instead, every component picks CUDA when it sees it).
- ``cuda``: require CUDA; fail otherwise.

``CUDA_VISIBLE_DEVICES=""`` or ``-1`` (CUDA's way to hide every GPU) also asks for CPU explicitly.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "SCOPE_DEVICE"
CHOICES = ("auto", "cpu", "cuda")
# Oldest driver a torch wheel built for CUDA <major> runs on: CUDA's minor-version compatibility
# within a major release (CUDA 12.x: R525.60.13, CUDA 13.x: R580).
MIN_DRIVER_FOR_CUDA_MAJOR = {12: "525.60.13", 13: "580"}
WHEEL_INDEX = "https://download.pytorch.org/whl"
_NVIDIA_DEVICE = re.compile(r"^nvidia\d+$")
_NO_GPU_VALUES = ("", "-1")


class DeviceMismatchError(RuntimeError):
    """GPUs are visible but torch cannot use them (or the requested device does not exist)."""


@dataclass(frozen=True)
class GpuEvidence:
    """What this machine shows of NVIDIA GPUs, independently of torch."""

    device_files: list[str] = field(default_factory=list)  # /dev/nvidia0, ...
    cuda_visible_devices: str | None = None                 # the variable, when it names devices
    nvidia_smi_gpus: list[str] = field(default_factory=list)  # "GPU 0: NVIDIA H100 ..." lines
    driver_version: str | None = None                        # e.g. "535.104.05"

    @property
    def gpus_visible(self) -> bool:
        return bool(self.device_files or self.cuda_visible_devices or self.nvidia_smi_gpus)

    def describe(self) -> str:
        parts = []
        if self.device_files:
            parts.append(f"device files {', '.join(self.device_files[:8])}")
        if self.nvidia_smi_gpus:
            parts.append(f"nvidia-smi lists {len(self.nvidia_smi_gpus)} GPU(s) ({self.nvidia_smi_gpus[0]})")
        if self.cuda_visible_devices:
            parts.append(f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices}")
        return "; ".join(parts)


def _run_nvidia_smi(exe: str, *args: str) -> str | None:
    try:
        proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gather_gpu_evidence(environ: Mapping[str, str] | None = None, dev_dir: str | Path = "/dev",
                        proc_driver_version: str | Path = "/proc/driver/nvidia/version") -> GpuEvidence:
    """Look for GPUs: device files under ``dev_dir``, ``CUDA_VISIBLE_DEVICES``, ``nvidia-smi`` on ``PATH``.

    The driver version comes from ``nvidia-smi`` when it runs, else from ``proc_driver_version``.
    """
    environ = os.environ if environ is None else environ
    dev = Path(dev_dir)
    device_files = sorted((str(p) for p in dev.iterdir() if _NVIDIA_DEVICE.match(p.name)),
                          key=lambda s: int(re.sub(r"\D", "", Path(s).name) or 0)) if dev.is_dir() else []
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    cvd = cvd.strip() if cvd is not None and cvd.strip() not in _NO_GPU_VALUES else None
    gpus: list[str] = []
    driver = None
    exe = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if exe:
        listing = _run_nvidia_smi(exe, "-L")
        gpus = [line.strip() for line in (listing or "").splitlines() if line.startswith("GPU ")]
        query = _run_nvidia_smi(exe, "--query-gpu=driver_version", "--format=csv,noheader")
        if query and query.strip():
            driver = query.strip().splitlines()[0].strip()
    if driver is None:
        try:
            text = Path(proc_driver_version).read_text()
        except OSError:
            text = ""
        match = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
        driver = match.group(1) if match else (text.splitlines()[0].strip() if text.strip() else None)
    return GpuEvidence(device_files, cvd, gpus, driver)


def _torch_cuda_error() -> str | None:
    """Why torch's CUDA does not initialise, in torch's words."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises RuntimeError / AssertionError with the reason
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def _driver_advice(driver: str | None) -> str:
    cuda = torch.version.cuda
    if cuda is None:
        return f"install a CUDA build of torch ({WHEEL_INDEX}/cu126, cu128 or cu130)"
    major = int(cuda.split(".")[0])
    need = MIN_DRIVER_FOR_CUDA_MAJOR.get(major)
    text = f"torch built for CUDA {cuda} needs an NVIDIA driver >= {need}" if need else f"torch is built for CUDA {cuda}"
    if driver and need:
        try:
            too_old = tuple(int(x) for x in driver.split(".")) < tuple(int(x) for x in need.split("."))
        except ValueError:
            too_old = False
        if too_old:
            text += f", and this driver ({driver}) is older"
    return (f"{text}; install a torch build the driver supports, e.g. `pip install torch --index-url "
            f"{WHEEL_INDEX}/cu126` (driver >= {MIN_DRIVER_FOR_CUDA_MAJOR[12]}; cu128 likewise) or upgrade the "
            f"driver to R580+ for cu130 (see setup.py)")


def check_device(environ: Mapping[str, str] | None = None, cuda_available: bool | None = None,
                 evidence: GpuEvidence | None = None) -> str:
    """``"cuda"`` or ``"cpu"``: the device this process will run megatron on, or raise.

    Raises :class:`DeviceMismatchError` when GPUs are visible but torch cannot use them (unless CPU
    was asked for), when ``SCOPE_DEVICE=cuda`` and CUDA is unusable, or when ``SCOPE_DEVICE=cpu``
    while torch can use CUDA; :class:`ValueError` for an unknown ``SCOPE_DEVICE``. ``environ``,
    ``cuda_available`` and ``evidence`` default to this process's (tests inject them).
    """
    environ = os.environ if environ is None else environ
    probe_transformer_engine()  # before megatron-core is imported: a broken TE must not crash it
    requested = environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if requested not in CHOICES:
        raise ValueError(f"{ENV_VAR}={environ.get(ENV_VAR)!r}: must be one of {', '.join(CHOICES)}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if available:
        if requested == "cpu":
            raise DeviceMismatchError(
                f"{ENV_VAR}=cpu, but torch can use {torch.cuda.device_count()} GPU(s) here and every component "
                f"picks CUDA when it sees it; hide the GPUs with CUDA_VISIBLE_DEVICES= to run on CPU")
        return "cuda"
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if requested == "cpu" or (requested == "auto" and cvd is not None and cvd.strip() in _NO_GPU_VALUES):
        logger.info("running on CPU as asked (%s)", f"{ENV_VAR}=cpu" if requested == "cpu"
                    else f"CUDA_VISIBLE_DEVICES={cvd!r}")
        return "cpu"
    found = gather_gpu_evidence(environ) if evidence is None else evidence
    if requested == "auto" and not found.gpus_visible:
        return "cpu"
    seen = found.describe() or "no GPU is visible"
    reason = _torch_cuda_error() if cuda_available is None else None
    raise DeviceMismatchError(
        f"{'GPUs are visible' if found.gpus_visible else f'{ENV_VAR}=cuda'} ({seen}) but torch cannot use "
        f"CUDA: torch.cuda.is_available() is False"
        + (f" ({reason})" if reason else "")
        + f". torch {torch.__version__} is built for CUDA {torch.version.cuda or 'none (CPU-only build)'}; "
        f"NVIDIA driver: {found.driver_version or 'unknown (nvidia-smi and /proc/driver/nvidia/version unreadable)'}. "
        f"{_driver_advice(found.driver_version)}. To run on CPU anyway set {ENV_VAR}=cpu "
        f"(or CUDA_VISIBLE_DEVICES=).")


# ------------------------------------------------------------------------------ Transformer Engine
@dataclass(frozen=True)
class TransformerEngineProbe:
    """The outcome of importing Transformer Engine the way megatron-core does, once per process."""

    installed: bool        # a transformer_engine package is on sys.path
    version: str | None
    error: str | None      # why an installed TE did not import (it is then hidden from megatron)


_TE_PROBE: TransformerEngineProbe | None = None


class _HiddenPackage(importlib.abc.MetaPathFinder):
    """Makes ``import <name>`` raise ``ModuleNotFoundError``: megatron then takes its no-TE paths."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"{fullname} is hidden: it failed to import ({self.reason})", name=fullname)
        return None


def probe_transformer_engine() -> TransformerEngineProbe:
    """Import ``transformer_engine`` and ``transformer_engine.pytorch.fp8`` (what megatron's ``HAVE_TE``
    needs, megatron-core 0.19 ``extensions/transformer_engine.py:69-85``) before megatron does.

    An installed TE that fails to import (a wheel built for another torch or CUDA: an undefined
    symbol, a missing cuDNN) would crash ``import megatron.core`` itself, because
    ``tensor_parallel/random.py:84-91`` only catches ``ModuleNotFoundError``. Such a TE is reported
    and hidden from the rest of the process (imports of it raise ``ModuleNotFoundError``), so
    megatron runs without it; :func:`scope_megatron.model.builder.resolve_layer_impl` then falls back
    or refuses with the recorded error. Call it before the first megatron-core import
    (:func:`check_device` does); later calls return the first result.
    """
    global _TE_PROBE
    if _TE_PROBE is not None:
        return _TE_PROBE
    import sys

    installed = importlib.util.find_spec("transformer_engine") is not None
    version = None
    error = None
    if installed:
        try:
            version = importlib.metadata.version("transformer_engine")
        except importlib.metadata.PackageNotFoundError:
            version = None
        try:
            import transformer_engine  # noqa: F401
            import transformer_engine.pytorch.fp8  # noqa: F401
        except Exception as err:  # ImportError (undefined symbol), OSError / RuntimeError from its libraries
            error = f"{type(err).__name__}: {err}"
            for name in [m for m in sys.modules if m == "transformer_engine" or m.startswith("transformer_engine.")]:
                del sys.modules[name]
            sys.meta_path.insert(0, _HiddenPackage("transformer_engine", error))
            logger.warning("Transformer Engine %sis installed but does not import (%s): hidden from megatron-core, "
                           "which runs without it", f"{version} " if version else "", error)
    _TE_PROBE = TransformerEngineProbe(installed, version, error)
    return _TE_PROBE
