"""``placement: colocated``: the student engines and the trainer take turns on the same devices.

Per step: the engines generate (they hold their weights and KV cache) -> :meth:`Colocation.to_training`
(the engines release their memory, ``/release_memory_occupation``; the trainer's gradient buffers
and optimizer state come back to the device) -> old log-probs and the update ->
:meth:`Colocation.to_generation` (gradient buffers freed, optimizer state offloaded to host
memory; the engines take their memory back, ``/resume_memory_occupation``) -> the weight sync
pushes the new weights in memory (``update_weights_from_tensor``), which also fills the resumed
engines' weights -> generation.

What is offloaded: the gradient buffers (their storage is freed and reallocated, zeroed, on the
way back: the next step zeroes them anyway, so nothing is copied) and the optimizer state
(moved to host memory and back). Parameters stay on the device: the weight sync reads them. On a
machine without CUDA the optimizer state already lives in host memory and only the gradient
buffers' storage is freed and reallocated; the memory figures are then the process's resident
set instead of the CUDA allocator's.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

import torch
import torch.distributed as dist

from .state import TrainingAborted

logger = logging.getLogger(__name__)

_GIB = 2.0**30


def device_memory_gib() -> float:
    """Memory this process holds on its device: the CUDA allocator's, else its resident set."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / _GIB
    with open("/proc/self/statm") as f:  # pages: size resident shared ...
        return int(f.read().split()[1]) * resource.getpagesize() / _GIB


def _grad_buffers(ddp_model: Any) -> list[torch.Tensor]:
    """The flat gradient buffers of megatron's DDP (dense and expert-parallel)."""
    buffers = list(getattr(ddp_model, "buffers", [])) + list(getattr(ddp_model, "expert_parallel_buffers", []))
    return [b.grad_data for b in buffers if getattr(b, "grad_data", None) is not None]


def _optimizer_states(optimizer: Any) -> list[dict[Any, dict[str, Any]]]:
    """The per-parameter state dicts of every torch optimizer inside megatron's (chained) optimizer."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt.optimizer.state for opt in inner if getattr(opt, "optimizer", None) is not None]


class Colocation:
    """Hands the devices back and forth between the trainer and its colocated engines (every rank;
    rank 0 drives the engines through the weight sync's transfer)."""

    def __init__(self, *, ddp_model: Any, optimizer: Any, weight_sync: Any, control_group: Any, is_controller: bool,
                 device: torch.device):
        self.ddp_model = ddp_model
        self.optimizer = optimizer
        self.weight_sync = weight_sync
        self.control_group = control_group
        self.is_controller = is_controller
        self.device = device
        self._grads_freed = False

    def _engines(self, action: str) -> None:
        """Rank 0 asks the engines to ``release`` / ``resume`` their memory; every rank agrees."""
        error = None
        if self.is_controller:
            try:
                transfer = self.weight_sync.transfer
                transfer.release_memory() if action == "release" else transfer.resume_memory()
            except Exception as exc:
                error = f"colocated student engines failed to {action} their memory: {type(exc).__name__}: {exc}"
        box = [error]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        if box[0] is not None:
            raise TrainingAborted(box[0])

    def to_training(self) -> dict[str, float]:
        """The engines release their memory; gradient buffers and optimizer state come back."""
        self._engines("release")
        released = device_memory_gib()
        if self._grads_freed:
            for grad in _grad_buffers(self.ddp_model):
                grad.untyped_storage().resize_(grad.numel() * grad.element_size())
                grad.zero_()
            self._grads_freed = False
        for state in _optimizer_states(self.optimizer):
            for values in state.values():
                for key, value in values.items():
                    if torch.is_tensor(value) and value.device != self.device and key != "step":
                        values[key] = value.to(self.device, non_blocking=True)
        return {"memory/engines_released_gib": released, "memory/trainer_loaded_gib": device_memory_gib()}

    def to_generation(self) -> dict[str, float]:
        """Gradient buffers freed, optimizer state to host memory; the engines resume (their
        weights arrive with the next weight sync)."""
        before = device_memory_gib()
        for grad in _grad_buffers(self.ddp_model):
            grad.untyped_storage().resize_(0)
        self._grads_freed = True
        if self.device.type != "cpu":
            for state in _optimizer_states(self.optimizer):
                for values in state.values():
                    for key, value in values.items():
                        if torch.is_tensor(value) and value.device.type != "cpu" and key != "step":
                            values[key] = value.to("cpu", non_blocking=True).pin_memory()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        offloaded = device_memory_gib()
        self._engines("resume")
        return {"memory/trainer_trained_gib": before, "memory/trainer_offloaded_gib": offloaded}
