"""The few monkeypatches megatron-core needs to run on a machine without CUDA (gloo, CPU tensors).

Applied by :func:`apply_cpu_shims` only when ``torch.cuda.is_available()`` is False; on a GPU
machine it does nothing (tested). Before patching it runs
:func:`scope_megatron.device_check.check_device`, which refuses a machine whose GPUs torch cannot
use (unless ``SCOPE_DEVICE=cpu``): the shims never switch on silently on a GPU node. No file of
site-packages is edited. What is patched, and why
(megatron-core 0.19.x; re-check every item when upgrading, see setup.py's pinned range):

1. ``torch.cuda.current_device()`` returns ``"cpu"``: megatron passes it as the ``device=``
   of buffers (p2p shapes, all-gather outputs, the attention score buffer, grad buffers).
2. In the megatron modules that pass a literal ``device="cuda"`` to factory functions (the
   schedule's token counter, optimizer flags, grad-norm buffers, checkpoint exchange), the
   module's ``torch`` is a proxy whose factories allocate on CPU; the real ``torch`` module is
   untouched, so HF models in the same process are unaffected. ``Tensor.cuda()`` returns the
   tensor itself.
3. ``torch.cuda.synchronize`` is a no-op; ``current_stream``/``default_stream`` return a
   stream whose ``wait_event``/``wait_stream``/``synchronize`` do nothing (DDP grad sync).
4. The CUDA RNG tracker's ``fork()`` is a null context when no CUDA RNG state was added
   (dropout is 0 in our models; the CPU generator is used otherwise).
5. ``Tensor.type()`` with no argument reports ``torch.cuda.*`` names for CPU float tensors:
   megatron's (distributed) optimizers and grad clipping dispatch on those strings.
6. Activation recomputation saves and restores the CUDA generator's state around the recomputed
   forward (``tensor_parallel/random.py:104-133, 135-170, 525-542``); there is none on CPU, so
   ``_get_cuda_rng_state`` returns an empty state and ``_set_cuda_rng_state`` ignores it (the CPU
   generator is saved and restored by the same code through ``torch.get_rng_state``).
7. While megatron-core is first imported, ``torch.compile`` defers its work to the first call of
   what it wraps: ``megatron/core/jit.py`` sets ``jit_fuser = torch.compile`` and the fusion
   modules decorate their helpers with it at import, and each ``torch.compile(fn)`` imports
   ``torch._dynamo`` (~1.2 s of CPU per process here), which no CPU run calls (the fusions are
   off on CPU). A helper that is called is compiled then, as before.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import types

import torch

logger = logging.getLogger(__name__)

_APPLIED = False
# Factory functions megatron calls with device="cuda" (or an int CUDA index).
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like", "ones_like")
# megatron-core modules that create tensors with a literal device="cuda" (0.19.x).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
)


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside one megatron module: factories with a CUDA device go to CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self._wrapped = {name: _cpu_factory(getattr(torch, name)) for name in _FACTORIES}

    def __getattr__(self, name: str):
        wrapped = self.__dict__["_wrapped"].get(name)
        return wrapped if wrapped is not None else getattr(torch, name)


class _NullStream:
    """Stands in for a CUDA stream: every ordering call is a no-op on CPU."""

    def wait_event(self, *_args, **_kwargs) -> None:
        return None

    def wait_stream(self, *_args, **_kwargs) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *_args, **_kwargs) -> None:
        return None


@contextlib.contextmanager
def _torch_compile_on_first_call():
    """``torch.compile(fn, **options)`` inside the block returns a wrapper that compiles ``fn``
    with the real ``torch.compile`` when it is first called (item 7)."""
    real_compile = torch.compile

    def deferred(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred(fn, **options)
        compiled = []

        @functools.wraps(model)
        def call(*args, **kwargs):
            if not compiled:
                compiled.append(real_compile(model, **options))
            return compiled[0](*args, **kwargs)
        return call

    torch.compile = deferred  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real_compile  # type: ignore[assignment]


def shims_active() -> bool:
    """Whether :func:`apply_cpu_shims` patched this process."""
    return _APPLIED


def apply_cpu_shims() -> bool:
    """Patch torch/megatron for CPU execution if CUDA is absent; return whether shims are active.

    Idempotent. Call it before building any megatron-core object.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    from .device_check import check_device

    check_device()  # raises on a GPU node whose GPUs torch cannot use

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    null_stream = _NullStream()
    torch.cuda.current_stream = lambda *a, **k: null_stream  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: null_stream  # type: ignore[assignment]
    cpu_torch = _CpuTorch()
    with _torch_compile_on_first_call() if "megatron.core" not in sys.modules else contextlib.nullcontext():
        for module_name in _CUDA_LITERAL_MODULES:
            importlib.import_module(module_name).torch = cpu_torch
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]

    original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mc_random

    original_fork = mc_random.CudaRNGStatesTracker.fork

    def _fork(self, name=mc_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            return contextlib.nullcontext()
        return original_fork(self, name)

    mc_random.CudaRNGStatesTracker.fork = _fork  # type: ignore[assignment]
    mc_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)  # type: ignore[assignment]
    mc_random._set_cuda_rng_state = lambda *a, **k: None  # type: ignore[assignment]

    _APPLIED = True
    logger.info("CUDA not available: megatron-core CPU shims applied")
    return True
