"""Trainer side of SGLang's weight-update protocol: push full HF-named tensors to engines.

Input: an iterable of ``(hf_name, full tensor)`` pairs produced on the trainer's rank 0 (the
Megatron -> HF gather and renaming happen elsewhere). Output: every engine serves those weights
and reports ``weight_version`` = the training step.

Per update (``docs/sglang-protocol.md`` §5)::

    distributed: pause_generation(retract) -> begin_weight_update (404 tolerated) ->
                 per bucket, POST update_weights_from_distributed (names, dtypes such as
                 "bfloat16", shapes; flush_cache and weight_version on the last bucket only)
                 to every engine, then broadcast the bucket's tensors from group rank 0
                 -> end_weight_update (404 tolerated) -> continue_generation
    disk:        pause_generation(retract) -> write an HF safetensors directory under a shared
                 path (shards of at most bucket_bytes, the index past one shard), POST
                 update_weights_from_disk to every engine -> continue_generation

Before its first group is formed every engine is cleaned of what a dead trainer may have left
(a pause, an open session, its group); the disk transport needs no such step (it opens no
session, and its own pause ends with a continue). The broadcast group is built as SGLang builds it
(:mod:`.dist_group`): the trainer is rank 0, engine ``i`` joins at
``rank_offset = 1 + sum(tp of engines before i)`` (TP-only servers: ``/server_info`` is checked);
the trainer's default ``torch.distributed`` group is never touched. Buckets hold at most ``bucket_bytes`` (a larger
tensor travels alone). Optionally one ``flattened_bucket`` uint8 buffer per bucket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..parallel import local_device
from .client import BackgroundLoop, SGLangClient, SGLangError
from .dist_group import DEFAULT_GROUP_NAME, destroy_weight_update_group, init_weight_update_group, tcp_init_method
from .protocol import UnalignedBucketError, dtype_name, flattened_bucket_layout

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 << 20


@dataclass
class WeightUpdateStats:
    """What one :meth:`WeightTransfer.update` moved and how long it took."""

    weight_version: str
    num_tensors: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    seconds_total: float = 0.0
    seconds_transfer: float = 0.0


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs, in order, into lists of at most ``bucket_bytes`` bytes."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in one update")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _with_last_flag(items: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with one item of lookahead."""
    try:
        current = next(items)
    except StopIteration:
        return
    for upcoming in items:
        yield current, False
        current = upcoming
    yield current, True


def flatten_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One uint8 buffer with the tensors' bytes back to back, at the offsets of
    :func:`.protocol.flattened_bucket_layout` (the layout the receiver unpacks).

    SGLang 0.5.23 does not pad the received buffer and refuses a tensor whose byte offset is not
    a multiple of its item size (``srt/weight_sync/tensor_bucket.py:98-101``,
    ``ValueError("Unaligned received tensor ...")``), which the trainer would only see as a
    hanging broadcast; such a bucket is refused here, before anything is sent.
    """
    try:
        layout = flattened_bucket_layout([str(i) for i in range(len(tensors))], [t.dtype for t in tensors],
                                         [t.shape for t in tensors])
    except UnalignedBucketError as exc:
        t = tensors[exc.index]
        raise ValueError(f"flattened_bucket: tensor {exc.index} ({t.dtype}, {list(t.shape)}) would start at byte "
                         f"{exc.offset}, not a multiple of its item size {exc.itemsize}; SGLang does not pad the "
                         f"flattened layout. Send one dtype per update (or sort the bucket by item size, largest "
                         f"first), or set sync.flattened_bucket=false") from None
    _, _, _, last_offset, last_size = layout[-1]
    buffer = torch.empty(last_offset + last_size, dtype=torch.uint8, device=tensors[0].device)
    for t, (_, _, _, off, size) in zip(tensors, layout):
        buffer[off:off + size].copy_(t.contiguous().view(-1).view(torch.uint8))
    return buffer


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (an IPv4 or IPv6 literal, or a host name)."""
    import socket

    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(address)
        return sock.getsockname()[1]


def resume_released_engines(record: str | Path, worker_urls: Sequence[str], api_key: str | None = None,
                            timeout_s: float = 60.0) -> list[str]:
    """Resume the colocated engines a trainer that died left released, before anything else
    reaches them; returns one line per engine for the log, and removes the record.

    SGLang 0.5.23 says nowhere whether an engine's memory is released (the tags live in the
    scheduler's ``offload_tags``, managers/scheduler_components/weight_updater.py:96, and no
    endpoint reports them), and both wrong guesses are fatal: ``/health`` on a released engine
    generates a token on unmapped memory (entrypoints/http_server.py:721-790), and resuming one
    that is not released raises ``KeyError`` in ``offload_tags.remove`` (weight_updater.py:389-390).
    So :meth:`WeightTransfer.release_memory` records the engines it released with their weight
    versions, and this resumes an engine only when it is in the record and still reports that
    version (``/model_info``, which generates nothing): a restarted server reports its initial
    version and is left alone. A trainer killed between the release request and its record
    (milliseconds) is not covered."""
    import httpx

    path = Path(record)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        recorded, tags = dict(data["engines"]), data.get("tags")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        path.unlink(missing_ok=True)
        return [f"ignored an unreadable record of released engines {path}: {exc}"]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    lines = []
    for url in (u.rstrip("/") for u in worker_urls):
        if url not in recorded:
            continue
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=timeout_s, trust_env=False) as client:
                version = client.get("/model_info").json().get("weight_version")
                if version != recorded[url]:
                    lines.append(f"{url}: reports weight version {version!r}, not {recorded[url]!r} as when it was "
                                 f"released (restarted since?): left as it is")
                    continue
                reply = client.post("/resume_memory_occupation", json={"tags": tags})
                reply.raise_for_status()
                lines.append(f"{url}: released by the previous trainer, resumed")
        except (httpx.HTTPError, ValueError) as exc:
            lines.append(f"{url}: resuming its released memory failed: {type(exc).__name__}: {exc}")
    path.unlink(missing_ok=True)
    return lines


def _test_stall_after_first_bucket() -> None:
    """Test hook: with ``SCOPE_MEGATRON_TEST_STALL_FILE`` set, touch that file and sleep forever after
    the first bucket of an update has been received (the engines are then paused, a session is
    open and the group is alive), so a test can kill the trainer mid-update deterministically.
    Unset (always, outside tests) it does nothing."""
    path = os.environ.get("SCOPE_MEGATRON_TEST_STALL_FILE")
    if not path:
        return
    logger.warning("SCOPE_MEGATRON_TEST_STALL_FILE is set: stalling mid weight update (test hook)")
    Path(path).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


class WeightTransfer:
    """Push weights from the trainer's rank 0 to one or more SGLang (or embedded) engines.

    ``transport="distributed"`` uses ``update_weights_from_distributed`` over a group this
    object creates (``backend`` gloo on CPU, nccl on GPU; default: nccl when CUDA is available);
    ``transport="disk"`` writes safetensors under ``disk_dir`` (a path every engine can read)
    and uses ``update_weights_from_disk``; ``transport="tensor"`` hands colocated engines (on
    this machine, on this rank's devices) handles to the tensors with
    ``update_weights_from_tensor`` (:class:`~scope_megatron.rollout.tensor_transport.TensorWeightSender`:
    CUDA IPC handles on a GPU, shared memory on CPU), and also moves their memory out of the
    way (:meth:`release_memory` / :meth:`resume_memory`). Call :meth:`update` each step,
    :meth:`close` at the end.

    Servers may outlive the trainer (and a killed trainer leaves them paused, with a session
    open and its group alive): before its first group is formed this object runs
    :meth:`SGLangClient.recover_stale_update` on every engine (:meth:`recover`). Each connect
    creates a group of its own, ``f"{group_name}_{8 hex digits}"``, so neither a stale group on
    a server nor a torch group of this process that could not be torn down can collide with it
    (torch refuses a second group of one name: ``distributed_c10d.py:2671``). ``group_record``
    (optional) is a file holding the live group's name, so that the next process can destroy
    it on the servers if this one dies. A failed update destroys the group on both sides.
    """

    def __init__(self, engine_urls: Sequence[str], transport: str = "distributed",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, master_address: str = "127.0.0.1",
                 master_port: int | None = None, group_name: str = DEFAULT_GROUP_NAME, backend: str | None = None,
                 disk_dir: str | Path | None = None, keep_disk_versions: int = 1, pause_mode: str = "retract",
                 flattened_bucket: bool = False, api_key: str | None = None, tp_sizes: Sequence[int] | None = None,
                 request_timeout_s: float = 1800.0, group_timeout_s: float = 600.0,
                 verify_version: bool = True, group_record: str | Path | None = None,
                 recovery_timeout_s: float = 60.0, released_record: str | Path | None = None,
                 tensor_urls: Sequence[str] | None = None):
        if transport not in ("distributed", "disk", "tensor"):
            raise ValueError(f"transport must be 'distributed', 'disk' or 'tensor', got {transport!r}")
        if transport == "disk" and disk_dir is None:
            raise ValueError("transport='disk' needs disk_dir (a path shared with the engines)")
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        # transport "tensor": the engines on this process's node, which it hands tensors to (default:
        # all); the others get theirs from a process on their own node (colocated across nodes)
        self.tensor_urls = self.engine_urls if tensor_urls is None else [u.rstrip("/") for u in tensor_urls]
        unknown = sorted(set(self.tensor_urls) - set(self.engine_urls))
        if unknown:
            raise ValueError(f"tensor_urls {unknown} are not among engine_urls {self.engine_urls}")
        self.transport = transport
        self.bucket_bytes = int(bucket_bytes)
        self.master_address = master_address
        self.master_port = master_port
        self.base_group_name = group_name
        self.group_name = group_name  # the live group's name once connected
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.keep_disk_versions = keep_disk_versions
        self.pause_mode = pause_mode
        self.flattened_bucket = flattened_bucket
        self.api_key = api_key
        self.tp_sizes = list(tp_sizes) if tp_sizes is not None else None
        self.request_timeout_s = request_timeout_s
        self.group_timeout_s = group_timeout_s
        self.verify_version = verify_version
        self.group_record = Path(group_record) if group_record is not None else None
        self.recovery_timeout_s = recovery_timeout_s
        # colocated engines whose memory is released now (see resume_released_engines)
        self.released_record = Path(released_record) if released_record is not None else None
        self._loop = BackgroundLoop("weight-transfer-loop")
        self._clients = [SGLangClient(u, api_key=api_key, timeout_s=request_timeout_s, max_retries=3)
                         for u in self.engine_urls]
        self._group: Any = None
        self._recovered = False
        self._written: list[Path] = []
        self._senders: list[Any] | None = None  # transport "tensor"

    # ------------------------------------------------------------------ helpers
    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``method`` on every engine concurrently; raises the first failure."""
        async def run() -> list[Any]:
            return list(await asyncio.gather(*(getattr(c, method)(*args, **kwargs) for c in self._clients)))
        return self._loop.run(run())

    def _each(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``method`` on every engine concurrently; each engine's result or exception, in order."""
        async def run() -> list[Any]:
            return list(await asyncio.gather(*(getattr(c, method)(*args, **kwargs) for c in self._clients),
                                             return_exceptions=True))
        return self._loop.run(run())

    @property
    def device(self) -> torch.device:
        """Where tensors must be for the broadcast backend."""
        return local_device(cuda=self.backend == "nccl")

    # ------------------------------------------------------------------ recovery and the group
    def _recorded_group(self) -> str | None:
        if self.group_record is None or not self.group_record.exists():
            return None
        try:
            return str(json.loads(self.group_record.read_text())["group_name"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable weight-group record %s: %s", self.group_record, exc)
            return None

    def _write_record(self, name: str | None) -> None:
        if self.group_record is None:
            return
        if name is None:
            self.group_record.unlink(missing_ok=True)
            return
        self.group_record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.group_record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"group_name": name, "engines": self.engine_urls}))
        tmp.replace(self.group_record)

    def recover(self) -> list[list[str]]:
        """Best effort, on every engine: end a stale session, destroy stale groups (the base name
        and the one in ``group_record``), continue generation. Never raises; returns per engine
        what was done (see :meth:`SGLangClient.recover_stale_update`)."""
        names = [self.base_group_name]
        recorded = self._recorded_group()
        if recorded is not None:
            names.append(recorded)
        results = self._each("recover_stale_update", names, timeout_s=self.recovery_timeout_s)
        self._recovered = True
        out = [r if isinstance(r, list) else [f"recovery failed: {r}"] for r in results]
        if recorded is not None and self._group is None:
            self._write_record(None)
        return out

    def _engine_tp_sizes(self) -> list[int]:
        """Each engine's TP size from ``/server_info``; refuses PP or DP servers."""
        infos = self._all("server_info")
        sizes, refused = [], []
        for url, info in zip(self.engine_urls, infos):
            tp = int(info.get("tp_size") or 1)
            pp = int(info.get("pp_size") or 1)
            dp = int(info.get("dp_size") or 1)
            if pp > 1 or dp > 1:
                refused.append(f"{url} (tp_size={tp}, pp_size={pp}, dp_size={dp})")
            sizes.append(tp)
        if refused:
            # SGLang 0.5.23 ranks a worker rank_offset + tp_rank, tp_rank within its pipeline stage
            # (model_executor/model_runner_components/weight_updater.py:124), so PP stages claim
            # the same ranks; DP servers fail an assertion on init_weights_update_group and
            # update_weights_from_distributed (managers/tokenizer_control_mixin.py:451, 509).
            raise ValueError(
                f"student servers {', '.join(refused)} cannot join the weight-update group: SGLang's "
                f"update_weights_from_distributed supports tensor parallelism only (pipeline stages would "
                f"collide on ranks, data-parallel servers refuse it). Serve the student with --tp-size only "
                f"(pp_size = dp_size = 1) and, for more throughput, run several such replicas behind the "
                f"router (rollout.student_urls=[...] with rollout.student_router_url), or use sync.transport=disk")
        if self.tp_sizes is not None and list(self.tp_sizes) != sizes:
            raise ValueError(f"tp_sizes {self.tp_sizes} disagree with the engines' /server_info tp_size {sizes}")
        return sizes

    def connect(self) -> None:
        """Create the broadcast group with every engine (distributed transport; idempotent).

        The engines' ``init_weights_update_group`` POSTs and this side's rendezvous run
        concurrently and are watched together: an engine that refuses (4xx/5xx) fails this call
        at once instead of after ``group_timeout_s`` in the rendezvous.
        """
        if self.transport != "distributed" or self._group is not None:
            return
        if not self._recovered:
            self.recover()
        tp_sizes = self._engine_tp_sizes()
        if len(tp_sizes) != len(self._clients):
            raise ValueError(f"tp_sizes has {len(tp_sizes)} entries for {len(self._clients)} engines")
        world_size = 1 + sum(tp_sizes)
        port = self.master_port or _free_port(self.master_address)
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(self._clients))]
        name = f"{self.base_group_name}_{uuid.uuid4().hex[:8]}"
        logger.info("creating weight-update group %r: world %d, trainer rank 0 at %s, engine offsets %s",
                    name, world_size, tcp_init_method(self.master_address, port), offsets)
        self._write_record(name)
        pending = [self._loop.submit(c.init_weights_update_group(self.master_address, port, off, world_size,
                                                                 name, self.backend,
                                                                 timeout_s=self.group_timeout_s))
                   for c, off in zip(self._clients, offsets)]
        local: Future = Future()
        abandoned = threading.Event()

        def join() -> None:
            try:
                group = init_weight_update_group(self.master_address, port, 0, world_size, name, self.backend,
                                                 timeout_s=self.group_timeout_s)
            except BaseException as exc:  # reported through the future
                local.set_exception(exc)
                return
            if abandoned.is_set():  # the caller gave up: do not leak the group
                destroy_weight_update_group(group)
            local.set_result(group)

        threading.Thread(target=join, name="weight-group-rendezvous", daemon=True).start()
        deadline = time.monotonic() + self.group_timeout_s + 30.0
        try:
            while True:
                for url, f in zip(self.engine_urls, pending):
                    if f.done() and f.exception() is not None:
                        raise SGLangError(f"engine {url} refused to join the weight-update group {name!r}: "
                                          f"{f.exception()}") from f.exception()
                if local.done() and local.exception() is not None:
                    raise local.exception()  # type: ignore[misc]
                if local.done() and all(f.done() for f in pending):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"weight-update group {name!r} not formed within "
                                       f"{self.group_timeout_s:.0f} s")
                time.sleep(0.01)
        except BaseException:
            abandoned.set()
            for f in pending:
                f.cancel()
            if local.done() and local.exception() is None:
                destroy_weight_update_group(local.result())
            self._destroy_on_engines(name)
            self._write_record(None)
            raise
        self._group = local.result()
        self.group_name = name

    def _destroy_on_engines(self, name: str, timeout_s: float = 30.0) -> None:
        """Best effort: destroy group ``name`` on every engine (a "does not exist" is fine)."""
        try:
            results = self._each("destroy_weights_update_group", name, timeout_s=timeout_s)
        except Exception as exc:
            logger.warning("destroying weight-update group %r on the engines failed: %s", name, exc)
            return
        for url, r in zip(self.engine_urls, results):
            if isinstance(r, BaseException) and "does not exist" not in str(r):
                logger.warning("destroying weight-update group %r on %s failed: %s", name, url, r)

    def _drop_group(self, reason: str) -> None:
        """After a failed update: destroy the group on the engines and here (best effort, bounded)."""
        group, name = self._group, self.group_name
        self._group = None
        if group is None:
            return
        logger.warning("dropping weight-update group %r: %s", name, reason)
        self._destroy_on_engines(name)
        # a broadcast still pending towards a peer that left can block the teardown: bound it
        closer = threading.Thread(target=destroy_weight_update_group, args=(group,), daemon=True,
                                  name="weight-group-teardown")
        closer.start()
        closer.join(30.0)
        self._write_record(None)

    # ------------------------------------------------------------------ the update
    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int | str) -> WeightUpdateStats:
        """Send every tensor to every engine and set their ``weight_version``; returns stats.

        Sequence: pause -> (distributed only) begin -> transfer -> end -> continue. Whatever
        fails, every engine is continued and every session that was opened is closed. The disk
        transport opens no session: ``update_weights_from_disk`` checks none and already
        restores and post-processes the weights itself
        (``managers/scheduler_components/weight_updater.py:138-163``,
        ``model_executor/model_runner_components/weight_updater.py:207-211``); an
        ``end_weight_update`` after it would post-process them a second time (``:323-335``).
        """
        version = str(weight_version)
        stats = WeightUpdateStats(weight_version=version)
        start = time.monotonic()
        if self.transport == "distributed":
            self.connect()
        opened = [False] * len(self._clients)
        failed = True
        try:
            self.pause()
            if self.transport == "distributed":
                results = self._each("begin_weight_update")
                opened = [not isinstance(r, BaseException) for r in results]
                self._raise_first(results, "begin_weight_update")
            transfer_start = time.monotonic()
            if self.transport == "distributed":
                self._send_distributed(named_tensors, version, stats)
            elif self.transport == "tensor":
                self.send_tensors(named_tensors, version, stats)
            else:
                self._send_disk(named_tensors, version, stats)
            stats.seconds_transfer = time.monotonic() - transfer_start
            failed = False
        finally:
            self._finish(opened, raise_errors=not failed)
        self.check_versions(version)
        stats.seconds_total = time.monotonic() - start
        logger.info("weight update %s: %d tensors, %.1f MiB in %d buckets, %.2f s (%s)", version, stats.num_tensors,
                    stats.num_bytes / 2**20, stats.num_buckets, stats.seconds_total, self.transport)
        return stats

    def pause(self) -> None:
        """``pause_generation`` on every engine (the first step of an update)."""
        self._raise_first(self._each("pause_generation", self.pause_mode), "pause_generation")

    def continue_generation(self, raise_errors: bool = True) -> None:
        """``continue_generation`` on every engine (the last step of an update; sessions, which
        only the distributed transport opens here, are not ended)."""
        self._finish([False] * len(self._clients), raise_errors=raise_errors)

    def check_versions(self, version: str) -> None:
        """With ``verify_version``: every engine must report ``version`` (after an update)."""
        if not self.verify_version:
            return
        got = self._all("weight_version")
        wrong = [(u, v) for u, v in zip(self.engine_urls, got) if v != version]
        if wrong:
            raise SGLangError(f"after the update, engines report other weight versions than {version!r}: {wrong}")

    def tensor_tp_sizes(self) -> list[int]:
        """Transport "tensor": each engine's TP size, in ``engine_urls`` order, as its in-memory
        sender uses it (read once from ``/server_info`` when the senders are made)."""
        return [sender.tp_size for sender in self._tensor_senders()]

    def _tensor_senders(self) -> list[Any]:
        """One in-memory sender per (colocated) engine, made on first use."""
        if self._senders is None:
            from .tensor_transport import TensorWeightSender

            self._senders = [TensorWeightSender(url, bucket_bytes=self.bucket_bytes, flattened_bucket=self.flattened_bucket,
                                                api_key=self.api_key, tp_size=tp, timeout_s=self.request_timeout_s)
                             for url, tp in zip(self.engine_urls, self._engine_tp_sizes())]
        return self._senders

    def send_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str,
                     stats: WeightUpdateStats) -> None:
        """Transport "tensor", engines paused: handles to the tensors, in buckets, to every engine of
        ``tensor_urls`` (its own begin/end session)."""
        senders = [s for s in self._tensor_senders() if s.engine_url in self.tensor_urls]
        named = named_tensors if len(senders) == 1 else list(named_tensors)
        for sender in senders:
            sent = sender.send(named, weight_version=version)
            stats.num_tensors, stats.num_bytes = int(sent["tensors"]), int(sent["bytes"])
            stats.num_buckets = int(sent["requests"])

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated engines (idle) free their GPU memory: ``/release_memory_occupation``. With
        ``released_record`` the engines and their weight versions are written there once they
        have released, so that a trainer started after this one died can resume them first."""
        versions = [info.get("weight_version") for info in self._all("model_info")] if self.released_record else []
        for sender in self._tensor_senders():
            sender.release(tags)
        if self.released_record is not None:
            self.released_record.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.released_record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"engines": dict(zip(self.engine_urls, versions)),
                                       "tags": list(tags) if tags else None}))
            tmp.replace(self.released_record)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Colocated engines take their memory back; their weights come with the next :meth:`update`."""
        for sender in self._tensor_senders():
            sender.resume(tags)
        if self.released_record is not None:
            self.released_record.unlink(missing_ok=True)

    def _raise_first(self, results: list[Any], what: str) -> None:
        for url, r in zip(self.engine_urls, results):
            if isinstance(r, BaseException):
                raise SGLangError(f"{what} on {url} failed: {r}") from r

    def _finish(self, opened: list[bool], raise_errors: bool) -> None:
        """End the sessions in ``opened``, then continue every engine; failures are raised only
        when the update itself succeeded (otherwise its own error is the one to report)."""
        errors: list[str] = []

        async def finish_one(client: SGLangClient, session: bool) -> None:
            try:
                if session:
                    await client.end_weight_update()
            except SGLangError as exc:
                errors.append(f"end_weight_update on {client.base_url} failed: {exc}")
            try:
                await client.continue_generation()
            except SGLangError as exc:
                errors.append(f"continue_generation on {client.base_url} failed: {exc}")

        async def run() -> None:
            await asyncio.gather(*(finish_one(c, o) for c, o in zip(self._clients, opened)))
        self._loop.run(run())
        if errors and raise_errors:
            raise SGLangError("; ".join(errors))
        for e in errors:
            logger.warning("after a failed weight update: %s", e)

    def _send_distributed(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str,
                          stats: WeightUpdateStats) -> None:
        import torch.distributed as dist

        device = self.device
        any_bucket = False
        for bucket, is_last in _with_last_flag(iter_buckets(named_tensors, self.bucket_bytes)):
            any_bucket = True
            names = [n for n, _ in bucket]
            tensors = [t.detach().to(device).contiguous() for _, t in bucket]
            dtypes = [dtype_name(t.dtype) for t in tensors]
            shapes = [list(t.shape) for t in tensors]
            flat = flatten_bucket(tensors) if self.flattened_bucket else None  # refuses before anything is sent
            posts = [self._loop.submit(c.update_weights_from_distributed(
                names, dtypes, shapes, group_name=self.group_name, flush_cache=is_last,
                weight_version=version if is_last else None,
                load_format="flattened_bucket" if self.flattened_bucket else None,
                timeout_s=self.request_timeout_s)) for c in self._clients]
            if flat is not None:
                works = [dist.broadcast(flat, group_src=0, group=self._group, async_op=True)]
            else:
                works = [dist.broadcast(t, group_src=0, group=self._group, async_op=True) for t in tensors]
            self._wait(works, posts)
            stats.num_buckets += 1
            stats.num_tensors += len(tensors)
            stats.num_bytes += sum(t.numel() * t.element_size() for t in tensors)
            if stats.num_buckets == 1:
                _test_stall_after_first_bucket()
        if not any_bucket:
            raise ValueError("update(): no tensors to send")

    def _wait(self, works: list[Any], posts: list[Future]) -> None:
        """Wait for the broadcasts, failing fast (and destroying the group) if an engine refused."""
        deadline = time.monotonic() + self.request_timeout_s
        while not all(w.is_completed() for w in works):
            failed = [f for f in posts if f.done() and f.exception() is not None]
            if failed or time.monotonic() > deadline:
                # the broadcast sequence is now out of step with the engines: the group is unusable
                error = failed[0].exception() if failed else \
                    TimeoutError(f"weight broadcast did not finish within {self.request_timeout_s:.0f} s")
                self._drop_group(str(error))
                raise error  # type: ignore[misc]
            time.sleep(0.0005)
        for w in works:
            w.wait()
        try:
            for f in posts:
                f.result(timeout=self.request_timeout_s)
        except BaseException as exc:
            self._drop_group(str(exc))
            raise

    def _send_disk(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str,
                   stats: WeightUpdateStats) -> None:
        """Write the weights as an HF safetensors directory (shards of at most ``bucket_bytes``, the
        index past one shard) and have every engine load it. SGLang 0.5.23 globs ``*.safetensors``
        and filters by ``model.safetensors.index.json`` only when it exists
        (``srt/model_loader/loader.py:547-574``, ``weight_utils.py:757-775``)."""
        from ..model.hf_io import SafetensorsShardWriter

        assert self.disk_dir is not None
        out = self.disk_dir / f"weight_v{version}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        writer = SafetensorsShardWriter(out, max_shard_bytes=self.bucket_bytes)
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):  # refuses a name sent twice
            for name, t in bucket:
                writer.add(name, t)
                stats.num_tensors += 1
        if not stats.num_tensors:
            raise ValueError("update(): no tensors to send")
        stats.num_buckets = len(writer.close())
        stats.num_bytes = writer.total_bytes
        self._all("update_weights_from_disk", str(out), weight_version=version, load_format="safetensors",
                  timeout_s=self.request_timeout_s)
        self._written.append(out)
        while len(self._written) > max(self.keep_disk_versions, 1):
            old = self._written.pop(0)
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Destroy the broadcast group on the engines and here; close the clients."""
        for sender in self._senders or []:
            sender.close()
        self._senders = None
        try:
            if self._group is not None:
                try:
                    self._all("destroy_weights_update_group", self.group_name)
                except SGLangError as exc:
                    logger.warning("destroying the engines' weight-update group failed: %s", exc)
                destroy_weight_update_group(self._group)
                self._group = None
                self._write_record(None)
            self._all("aclose")
        finally:
            self._loop.close()

    def __enter__(self) -> "WeightTransfer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
