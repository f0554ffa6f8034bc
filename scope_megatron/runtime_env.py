"""Process environment the trainer needs, set once at the start of :mod:`scope_megatron.train`.

:func:`apply_runtime_env` runs before torch.distributed, NCCL or CUDA initialise (they read
these variables once, at initialisation). Each variable is set only when the user has not set
it (``setdefault``): a value in the job's environment always wins. docs/training.md has the
table of variables, values and reasons.
"""

from __future__ import annotations

import logging
import os
from typing import MutableMapping

logger = logging.getLogger(__name__)

# variable -> (value, why); the order is the order of the log line
RUNTIME_DEFAULTS: dict[str, tuple[str, str]] = {
    # SGLang servers force both to 0 unless set (SGLang 0.5.23 srt/entrypoints/engine.py:1898-1913);
    # the trainer's side of the NCCL weight-update group must use the same NCCL memory and
    # NVLink-SHARP settings, or group formation / the broadcast can hang or crash.
    "NCCL_CUMEM_ENABLE": ("0", "match SGLang's side of the NCCL weight-update group"),
    "NCCL_NVLS_ENABLE": ("0", "match SGLang's side of the NCCL weight-update group"),
    # megatron's TP layers want one hardware queue so the async dgrad all-reduce / sequence
    # parallel communication is scheduled before the compute it overlaps (megatron/core/
    # tensor_parallel/layers.py:846-860 warns otherwise). Read when the CUDA context is created;
    # ignored on CPU.
    "CUDA_DEVICE_MAX_CONNECTIONS": ("1", "megatron's TP communication/compute overlap"),
    # packed rows change length every micro-batch: expandable segments avoid fragmentation OOMs
    "PYTORCH_CUDA_ALLOC_CONF": ("expandable_segments:True", "variable-length packed micro-batches"),
}

# torch >= 2.9 also reads the allocator settings from this name (c10/core/AllocatorConfig.h):
# a user who set it has chosen the allocator configuration
_ALLOC_ALIASES = ("PYTORCH_ALLOC_CONF",)


def apply_runtime_env(environ: MutableMapping[str, str] | None = None) -> dict[str, tuple[str, bool]]:
    """Set the trainer's environment defaults in ``environ`` (default ``os.environ``) where unset.

    Returns ``{variable: (value in effect, set by us)}``; a user's own value is kept and
    reported with ``False``. Must run before CUDA / NCCL initialise to have an effect.
    """
    env = os.environ if environ is None else environ
    effect: dict[str, tuple[str, bool]] = {}
    for name, (value, _) in RUNTIME_DEFAULTS.items():
        if name == "PYTORCH_CUDA_ALLOC_CONF" and name not in env:
            alias = next((a for a in _ALLOC_ALIASES if a in env), None)
            if alias is not None:
                effect[alias] = (env[alias], False)
                continue
        if name in env:
            effect[name] = (env[name], False)
        else:
            env[name] = value
            effect[name] = (value, True)
    return effect


def describe_runtime_env(effect: dict[str, tuple[str, bool]]) -> str:
    """One log line: ``NAME=value`` each, ``(user)`` for values the user set."""
    return ", ".join(f"{name}={value}" + ("" if ours else " (user)") for name, (value, ours) in effect.items())


def log_runtime_env(effect: dict[str, tuple[str, bool]], rank: int) -> None:
    """Log the values in effect once (rank 0)."""
    if rank == 0:
        logger.info("runtime environment: %s", describe_runtime_env(effect))
