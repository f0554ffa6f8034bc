"""The weight-update process group, built exactly as SGLang 0.5.23 builds it.

SGLang's ``init_custom_process_group`` (``sglang/srt/utils/common.py``) does:
``rendezvous("tcp://addr:port", rank, world_size)`` -> ``PrefixStore(group_name, store)`` ->
``_new_process_group_helper(world_size, rank, [], backend, store, group_name=...)`` and
registers an identity rank map. The trainer side must build an *equivalent* group (same URL,
same store prefix, rank 0); ``torch.distributed.init_process_group`` would not match and would
also clobber the trainer's own default group. This module is used by both sides here: the
trainer (``weight_transfer.py``) and the embedded engine. It never touches the default group.
"""

from __future__ import annotations

import logging
from datetime import timedelta

logger = logging.getLogger(__name__)

DEFAULT_GROUP_NAME = "weight_update_group"


def tcp_init_method(master_address: str, master_port: int) -> str:
    """``tcp://host:port`` with an IPv6 literal bracketed (``tcp://[::1]:port``), as SGLang 0.5.23's
    ``NetworkAddress(...).to_tcp()`` builds it for the engines' side
    (``srt/utils/network.py:526-565``, used at ``model_executor/model_runner_components/weight_updater.py:132-135``)."""
    import ipaddress

    host = master_address.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        is_v6 = isinstance(ipaddress.ip_address(host.split("%", 1)[0]), ipaddress.IPv6Address)
    except ValueError:  # a host name
        is_v6 = False
    return f"tcp://[{host}]:{master_port}" if is_v6 else f"tcp://{host}:{master_port}"


def init_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                             group_name: str = DEFAULT_GROUP_NAME, backend: str = "nccl",
                             timeout_s: float = 600.0):
    """Join the weight-update group as ``rank``; blocks until all ``world_size`` ranks join.

    Rank 0 hosts the TCP store on ``master_port``. Returns the ``ProcessGroup``. No barrier or
    other collective is issued (SGLang 0.5.23 issues none; an extra one would misalign the
    broadcast sequence).
    """
    import torch
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=timeout_s)
    url = tcp_init_method(master_address, master_port)
    logger.info("joining weight-update group %r at %s as rank %d/%d (%s)", group_name, url, rank, world_size, backend)
    store, rank, world_size = next(rendezvous(url, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    major_minor = tuple(int(x) for x in torch.__version__.split(".")[:2])
    options_kw = "backend_options" if major_minor >= (2, 6) else "pg_options"
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      timeout=timeout, **{options_kw: None})
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_update_group(group) -> None:
    """Tear down a group made by :func:`init_weight_update_group` (best effort)."""
    import torch.distributed as dist

    try:
        dist.destroy_process_group(group)
    except Exception as exc:  # a half-built group (peer died) must not block shutdown
        logger.warning("destroying weight-update group failed: %s", exc)
