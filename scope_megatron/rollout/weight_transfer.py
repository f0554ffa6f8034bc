"""Trainer side of SGLang's weight-update protocol: push full HF-named tensors to engines.

Input: an iterable of ``(hf_name, full tensor)`` pairs produced on the trainer's rank 0 (the
Megatron -> HF gather and renaming happen elsewhere). Output: every engine serves those weights
and reports ``weight_version`` = the training step.

Per update (``docs/research/sglang-api.md`` §2.9's recommended sequence)::

    pause_generation(retract) -> begin_weight_update (404 tolerated) ->
        distributed: per bucket, POST update_weights_from_distributed (names, dtypes such as
                     "bfloat16", shapes; flush_cache and weight_version on the last bucket only)
                     to every engine, then broadcast the bucket's tensors from group rank 0;
        disk:        write safetensors buckets + index under a shared path, then POST
                     update_weights_from_disk to every engine;
    -> end_weight_update (404 tolerated) -> continue_generation

The broadcast group is built as SGLang builds it (:mod:`.dist_group`): the trainer is rank 0,
engine ``i`` joins at ``rank_offset = 1 + sum(tp of engines before i)``; the trainer's default
``torch.distributed`` group is never touched. Buckets hold at most ``bucket_bytes`` (a larger
tensor travels alone). Optionally one ``flattened_bucket`` uint8 buffer per bucket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..parallel import free_port
from .client import BackgroundLoop, SGLangClient, SGLangError
from .dist_group import DEFAULT_GROUP_NAME, destroy_weight_update_group, init_weight_update_group
from .protocol import dtype_name

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
    """One uint8 buffer with each tensor's bytes at an offset aligned to its item size
    (SGLang's ``flattened_bucket`` layout)."""
    offsets, pos = [], 0
    for t in tensors:
        item = t.element_size()
        pos = (pos + item - 1) // item * item
        offsets.append(pos)
        pos += t.numel() * item
    buffer = torch.zeros(pos, dtype=torch.uint8, device=tensors[0].device if tensors else "cpu")
    for t, off in zip(tensors, offsets):
        flat = t.contiguous().view(-1).view(torch.uint8)
        buffer[off:off + flat.numel()].copy_(flat)
    return buffer


class WeightTransfer:
    """Push weights from the trainer's rank 0 to one or more SGLang (or embedded) engines.

    ``transport="distributed"`` uses ``update_weights_from_distributed`` over a group this
    object creates (``backend`` gloo on CPU, nccl on GPU; default: nccl when CUDA is available);
    ``transport="disk"`` writes safetensors under ``disk_dir`` (a path every engine can read)
    and uses ``update_weights_from_disk``. Call :meth:`update` each step, :meth:`close` at the end.
    """

    def __init__(self, engine_urls: Sequence[str], transport: str = "distributed",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, master_address: str = "127.0.0.1",
                 master_port: int | None = None, group_name: str = DEFAULT_GROUP_NAME, backend: str | None = None,
                 disk_dir: str | Path | None = None, keep_disk_versions: int = 1, pause_mode: str = "retract",
                 flattened_bucket: bool = False, api_key: str | None = None, tp_sizes: Sequence[int] | None = None,
                 request_timeout_s: float = 1800.0, group_timeout_s: float = 600.0,
                 verify_version: bool = True):
        if transport not in ("distributed", "disk"):
            raise ValueError(f"transport must be 'distributed' or 'disk', got {transport!r}")
        if transport == "disk" and disk_dir is None:
            raise ValueError("transport='disk' needs disk_dir (a path shared with the engines)")
        if not engine_urls:
            raise ValueError("engine_urls is empty")
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        self.transport = transport
        self.bucket_bytes = int(bucket_bytes)
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.keep_disk_versions = keep_disk_versions
        self.pause_mode = pause_mode
        self.flattened_bucket = flattened_bucket
        self.tp_sizes = list(tp_sizes) if tp_sizes is not None else None
        self.request_timeout_s = request_timeout_s
        self.group_timeout_s = group_timeout_s
        self.verify_version = verify_version
        self._loop = BackgroundLoop("weight-transfer-loop")
        self._clients = [SGLangClient(u, api_key=api_key, timeout_s=request_timeout_s, max_retries=3)
                         for u in self.engine_urls]
        self._group: Any = None
        self._written: list[Path] = []

    # ------------------------------------------------------------------ helpers
    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        async def run() -> list[Any]:
            return list(await asyncio.gather(*(getattr(c, method)(*args, **kwargs) for c in self._clients)))
        return self._loop.run(run())

    @property
    def device(self) -> torch.device:
        """Where tensors must be for the broadcast backend."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def connect(self) -> None:
        """Create the broadcast group with every engine (distributed transport; idempotent)."""
        if self.transport != "distributed" or self._group is not None:
            return
        if self.tp_sizes is None:
            infos = self._all("server_info")
            self.tp_sizes = [int(i.get("tp_size", 1)) * int(i.get("pp_size", 1) or 1) for i in infos]
        if len(self.tp_sizes) != len(self._clients):
            raise ValueError(f"tp_sizes has {len(self.tp_sizes)} entries for {len(self._clients)} engines")
        world_size = 1 + sum(self.tp_sizes)
        port = self.master_port or free_port(self.master_address)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self._clients))]
        logger.info("creating weight-update group %r: world %d, trainer rank 0 at %s:%d, engine offsets %s",
                    self.group_name, world_size, self.master_address, port, offsets)
        # the POSTs block until all ranks joined: keep them in flight while this side joins
        pending = [self._loop.submit(c.init_weights_update_group(self.master_address, port, off, world_size,
                                                                 self.group_name, self.backend,
                                                                 timeout_s=self.group_timeout_s))
                   for c, off in zip(self._clients, offsets)]
        try:
            self._group = init_weight_update_group(self.master_address, port, 0, world_size, self.group_name,
                                                   self.backend, timeout_s=self.group_timeout_s)
        except Exception:
            for f in pending:
                f.cancel()
            raise
        for f in pending:
            f.result(timeout=self.group_timeout_s)

    # ------------------------------------------------------------------ the update
    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int | str) -> WeightUpdateStats:
        """Send every tensor to every engine and set their ``weight_version``; returns stats."""
        version = str(weight_version)
        stats = WeightUpdateStats(weight_version=version)
        start = time.monotonic()
        if self.transport == "distributed":
            self.connect()
        self._all("pause_generation", self.pause_mode)
        sessions_opened = False
        try:
            self._all("begin_weight_update")
            sessions_opened = True
            transfer_start = time.monotonic()
            if self.transport == "distributed":
                self._send_distributed(named_tensors, version, stats)
            else:
                self._send_disk(named_tensors, version, stats)
            stats.seconds_transfer = time.monotonic() - transfer_start
        finally:
            try:
                if sessions_opened:
                    self._all("end_weight_update")
            finally:
                self._all("continue_generation")
        if self.verify_version:
            got = self._all("weight_version")
            wrong = [(u, v) for u, v in zip(self.engine_urls, got) if v != version]
            if wrong:
                raise SGLangError(f"after the update, engines report other weight versions than {version!r}: {wrong}")
        stats.seconds_total = time.monotonic() - start
        logger.info("weight update %s: %d tensors, %.1f MiB in %d buckets, %.2f s (%s)", version, stats.num_tensors,
                    stats.num_bytes / 2**20, stats.num_buckets, stats.seconds_total, self.transport)
        return stats

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
            posts = [self._loop.submit(c.update_weights_from_distributed(
                names, dtypes, shapes, group_name=self.group_name, flush_cache=is_last,
                weight_version=version if is_last else None,
                load_format="flattened_bucket" if self.flattened_bucket else None,
                timeout_s=self.request_timeout_s)) for c in self._clients]
            if self.flattened_bucket:
                works = [dist.broadcast(flatten_bucket(tensors), group_src=0, group=self._group, async_op=True)]
            else:
                works = [dist.broadcast(t, group_src=0, group=self._group, async_op=True) for t in tensors]
            self._wait(works, posts)
            stats.num_buckets += 1
            stats.num_tensors += len(tensors)
            stats.num_bytes += sum(t.numel() * t.element_size() for t in tensors)
        if not any_bucket:
            raise ValueError("update(): no tensors to send")

    def _wait(self, works: list[Any], posts: list[Future]) -> None:
        """Wait for the broadcasts, failing fast (and dropping the group) if an engine refused."""
        deadline = time.monotonic() + self.request_timeout_s
        while not all(w.is_completed() for w in works):
            failed = [f for f in posts if f.done() and f.exception() is not None]
            if failed or time.monotonic() > deadline:
                # the broadcast sequence is now out of step with the engines: rebuild next time
                self._group = None
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                raise TimeoutError(f"weight broadcast did not finish within {self.request_timeout_s:.0f} s")
            time.sleep(0.0005)
        for w in works:
            w.wait()
        for f in posts:
            f.result(timeout=self.request_timeout_s)

    def _send_disk(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str,
                   stats: WeightUpdateStats) -> None:
        from safetensors.torch import save_file

        assert self.disk_dir is not None
        out = self.disk_dir / f"weight_v{version}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        weight_map: dict[str, str] = {}
        buckets = list(iter_buckets(named_tensors, self.bucket_bytes))
        if not buckets:
            raise ValueError("update(): no tensors to send")
        for i, bucket in enumerate(buckets):
            fname = f"model-{i + 1:05d}-of-{len(buckets):05d}.safetensors"
            seen: set[int] = set()
            payload = {}
            for name, t in bucket:
                t = t.detach().to("cpu").contiguous()
                if t.data_ptr() in seen:
                    t = t.clone()
                seen.add(t.data_ptr())
                payload[name] = t
                weight_map[name] = fname
                stats.num_tensors += 1
                stats.num_bytes += t.numel() * t.element_size()
            save_file(payload, str(out / fname), metadata={"format": "pt"})
            stats.num_buckets += 1
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": stats.num_bytes}, "weight_map": weight_map}, indent=1))
        self._all("update_weights_from_disk", str(out), weight_version=version, load_format="safetensors",
                  timeout_s=self.request_timeout_s)
        self._written.append(out)
        while len(self._written) > max(self.keep_disk_versions, 1):
            old = self._written.pop(0)
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Destroy the broadcast group on the engines and here; close the clients."""
        try:
            if self._group is not None:
                try:
                    self._all("destroy_weights_update_group", self.group_name)
                except SGLangError as exc:
                    logger.warning("destroying the engines' weight-update group failed: %s", exc)
                destroy_weight_update_group(self._group)
                self._group = None
            self._all("aclose")
        finally:
            self._loop.close()

    def __enter__(self) -> "WeightTransfer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
