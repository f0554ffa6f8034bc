"""torch.distributed and megatron-core parallel state, set up the same way by every entry point.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK) and as a plain single process
(a one-rank group on a free local port). NCCL on GPU, gloo on CPU (with :mod:`cpu_shims`).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cpu_shims import apply_cpu_shims

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """This rank's place in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp: int = 1  # context parallel size (DP = world / (tp * pp * cp))
    cp_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for rendezvous, engines, weight-update groups)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise the default process group once (torchrun env, or a single local rank)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:  # a plain process: a group of one on a free local port (the environment is left alone)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, cp: int = 1) -> Layout:
    """Set up torch.distributed and megatron's TP/PP/CP/DP groups; return this rank's :class:`Layout`.

    DP is world_size / (tp * pp * cp). Re-initialises megatron's groups if they exist with other
    sizes. Context parallelism (``cp > 1``) needs packed micro-batches split with
    :func:`scope_megatron.packing.shard_for_context_parallel`.
    """
    apply_cpu_shims()
    init_distributed()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp}")
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_context_parallel_world_size()) != (tp, pp, cp):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return current_layout()


def current_layout() -> Layout:
    """The :class:`Layout` of the initialised megatron parallel state."""
    from megatron.core import parallel_state as ps

    return Layout(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        cp=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
    )


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (end of a job or test)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
