"""torch.distributed and megatron-core parallel state, set up the same way by every entry point.

Works under ``torchrun`` (reads RANK / WORLD_SIZE / LOCAL_RANK) and as a plain single process
(a one-rank group on a free local port). NCCL on GPU, gloo on CPU (with :mod:`cpu_shims`).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from .cpu_shims import apply_cpu_shims
from .device_check import check_device

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
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def local_device(cuda: bool | None = None) -> torch.device:
    """This process's device: the current CUDA device (set from LOCAL_RANK by :func:`init_distributed`)
    when ``cuda`` (default: whether CUDA is available), else the CPU."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for rendezvous, engines, weight-update groups)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Initialise the default process group once (torchrun env, or a single local rank).

    ``timeout_minutes`` bounds how long a rank waits in a collective (None: torch's default,
    10 minutes for NCCL); the trainer passes ``parallel.distributed_timeout_minutes``.
    """
    if dist.is_initialized():
        return
    check_device()  # a GPU node whose GPUs torch cannot use must not fall back to gloo on CPU
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **timeout)
    else:  # a plain process: a group of one on a free local port (the environment is left alone)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                **timeout)


_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_master_address(setting: str, engine_urls: list[str] | None) -> str:
    """The address rank 0 binds for the weight-update group and the engines connect to.

    An explicit ``setting`` (a host name or IP) is returned as given. ``"auto"``: loopback when
    the first engine URL is on this host's loopback (embedded engines); otherwise the local IP of
    the interface that routes to that engine (a UDP ``connect`` picks the route and sends no
    packet); without a usable URL, this host's FQDN resolved to an IP.
    """
    if setting != "auto":
        return setting
    host = urlsplit(engine_urls[0]).hostname if engine_urls else None
    if host and _is_loopback(host):
        return "::1" if ":" in host else "127.0.0.1"
    if host:
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, 80, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(sockaddr)
                address = s.getsockname()[0]
            if address and not ipaddress.ip_address(address).is_unspecified:
                return address
        except OSError as exc:
            logger.warning("sync.master_address=auto: no route to the engine host %s (%s); using this host's "
                           "FQDN", host, exc)
    return socket.gethostbyname(socket.getfqdn())


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, cp: int = 1,
                  timeout_minutes: float | None = None) -> Layout:
    """Set up torch.distributed and megatron's TP/PP/CP/DP groups; return this rank's :class:`Layout`.

    DP is world_size / (tp * pp * cp). Re-initialises megatron's groups if they exist with other
    sizes. Context parallelism (``cp > 1``) needs packed micro-batches split with
    :func:`scope_megatron.packing.shard_for_context_parallel`. ``timeout_minutes`` is the
    collective timeout of the default group and of megatron's groups (None: torch's and
    megatron's defaults).
    """
    apply_cpu_shims()
    init_distributed(timeout_minutes)
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
        timeout = {} if timeout_minutes is None else {"distributed_timeout_minutes": max(1, math.ceil(timeout_minutes))}
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp, **timeout)
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
    """Tear down megatron's groups and the default process group (end of a job or test).
    A process that never imported megatron-core has no groups of it to tear down, and is not made
    to import it (seconds) on its way out."""
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
