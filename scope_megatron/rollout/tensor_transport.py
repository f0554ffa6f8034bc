"""In-memory weight pushes for colocated engines: SGLang 0.5.23's ``/update_weights_from_tensor``.

A colocated engine shares the trainer's devices, so the trainer hands it *handles* to tensors it
already holds instead of their bytes: CUDA IPC handles on a GPU, shared-memory file names on
CPU. The wire format is SGLang's (srt/entrypoints/http_server.py:1436-1455,
srt/managers/io_struct.py:2027-2047): ``serialized_named_tensors`` has one base64 string per
engine TP rank, each the ``MultiprocessingSerializer.serialize(obj, output_str=True)`` of
``obj`` (srt/utils/common.py:3060-3082: a ``ForkingPickler`` dump, base64-encoded), where
``obj`` is either

- a list of ``(name, tensor)`` pairs (``load_format`` null), or
- with ``load_format="flattened_bucket"`` the dict ``{"flattened_tensor": uint8 tensor,
  "metadata": [FlattenedTensorMetadata, ...]}`` that the model runner unpacks
  (srt/model_executor/model_runner_components/weight_updater.py:383-409).

SGLang decodes with a restricted unpickler (srt/utils/common.py:3160-3372): only torch's tensor
and storage rebuild functions, plain containers and a few SGLang data classes may appear. The
pickler here writes exactly those names without SGLang installed: the metadata class and the
UUID-aware CUDA rebuild (srt/utils/patch_torch.py:72-99) are written under their SGLang module
names.

CPU tensors travel under torch's ``file_system`` sharing strategy (:func:`use_file_system_sharing`):
the pickle holds a shared-memory file name that any local process can open. Under the default
``file_descriptor`` strategy the pickle holds a file descriptor handed over a live
``multiprocessing`` connection, which an HTTP peer does not have (and SGLang's unpickler refuses
its ``DupFd``). The sender keeps every tensor of a bucket alive until the engine replied.

:class:`TensorWeightSender` is the trainer's side (bucketing, serialising, POSTing, and the
``/release_memory_occupation`` / ``/resume_memory_occupation`` calls); the embedded engine's
decoder is :func:`scope_megatron.rollout.engine.weights.deserialize_tensor_payload`.
"""

from __future__ import annotations

import base64
import io
import logging
import pickle
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .weight_transfer import iter_buckets

logger = logging.getLogger(__name__)

# where SGLang's decoder finds the classes it allows (srt/utils/common.py:3352-3358)
SGLANG_TENSOR_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"
SGLANG_WEIGHT_UPDATER_MODULE = "sglang.srt.model_executor.model_runner_components.weight_updater"
SGLANG_PATCH_TORCH_MODULE = "sglang.srt.utils.patch_torch"
# SGLang's memory tags (srt/constants.py:2-10); an empty or absent list means all of them
GPU_MEMORY_TYPE_KV_CACHE = "kv_cache"
GPU_MEMORY_TYPE_WEIGHTS = "weights"
GPU_MEMORY_TYPE_CUDA_GRAPH = "cuda_graph"
GPU_MEMORY_ALL_TYPES = (GPU_MEMORY_TYPE_KV_CACHE, GPU_MEMORY_TYPE_WEIGHTS, GPU_MEMORY_TYPE_CUDA_GRAPH)
FLATTENED_BUCKET = "flattened_bucket"
# ForkingPickler's protocol; SGLang accepts any (srt/utils/common.py:3105-3106)
PICKLE_PROTOCOL = 4
# torch.multiprocessing.reductions.rebuild_cuda_tensor's device argument
# (SGLang's _REDUCE_TENSOR_ARG_DEVICE_INDEX, srt/utils/patch_torch.py:64)
CUDA_DEVICE_ARG_INDEX = 6


@dataclass
class FlattenedTensorMetadata:
    """One tensor's place in a flattened bucket; SGLang's class of that name, field for field
    (srt/weight_sync/tensor_bucket.py:7-16). Pickled under SGLang's module name."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int  # byte offsets into the uint8 buffer: [start_idx, end_idx)
    end_idx: int
    numel: int      # bytes


@dataclass
class LocalSerializedTensor:
    """A tensor serialised once per TP rank (``values[rank]`` is that rank's serializer bytes);
    SGLang's class (srt/model_executor/model_runner_components/weight_updater.py:450-458)."""

    values: list[bytes]

    def get(self, rank: int) -> Any:
        from .engine.weights import deserialize_tensor_payload

        return deserialize_tensor_payload(self.values[rank])


_shm_manager_started = False


def use_file_system_sharing() -> None:
    """Share CPU tensors by shared-memory file name (process-wide torch setting); see the module doc.

    The first ``file_system`` share starts torch's ``torch_shm_manager`` daemon (libshm's
    ``start_manager``, a fork + exec), which inherits this process's stdout and stderr and lives
    until every process using the memory has let go of it: with an engine that outlives the
    trainer (servers started by ``launch/sglang_servers.sh``), a caller reading the trainer's
    output to its end (``train.sh | tee``, ``subprocess.run(capture_output=True)``) would wait
    for the servers to stop. So the daemon is started here with those two descriptors on
    ``/dev/null``."""
    import os
    import sys

    import torch
    import torch.multiprocessing as mp

    global _shm_manager_started
    if mp.get_sharing_strategy() != "file_system":
        mp.set_sharing_strategy("file_system")
    if _shm_manager_started:
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        torch.empty(1).share_memory_()  # starts the manager, with /dev/null as its stdio
        _shm_manager_started = True
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def cuda_device_uuid(index: int) -> str:
    """The UUID SGLang's patched reducer writes in place of a CUDA device index (patch_torch.py:85-86)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def rebuild_cuda_tensor_by_uuid(*args: Any) -> torch.Tensor:
    """SGLang's ``_rebuild_cuda_tensor_modified`` (patch_torch.py:80-99): the device argument may
    be a device UUID (the sender's numbering need not be the receiver's); mapped to the local index."""
    from torch.multiprocessing import reductions

    device = args[CUDA_DEVICE_ARG_INDEX]
    if isinstance(device, str):
        matches = [i for i in range(torch.cuda.device_count()) if cuda_device_uuid(i) == device]
        if not matches:
            raise RuntimeError(f"Invalid device_uuid={device}")
        device = matches[0]
    elif not isinstance(device, int):
        raise RuntimeError(f"Unknown type: device_maybe_uuid={device!r}")
    args = (*args[:CUDA_DEVICE_ARG_INDEX], device, *args[CUDA_DEVICE_ARG_INDEX + 1:])
    return reductions.rebuild_cuda_tensor(*args)


# local object -> the (module, name) SGLang's unpickler knows it by
SGLANG_GLOBAL_NAMES = {
    FlattenedTensorMetadata: (SGLANG_TENSOR_BUCKET_MODULE, "FlattenedTensorMetadata"),
    LocalSerializedTensor: (SGLANG_WEIGHT_UPDATER_MODULE, "LocalSerializedTensor"),
    rebuild_cuda_tensor_by_uuid: (SGLANG_PATCH_TORCH_MODULE, "_rebuild_cuda_tensor_modified"),
}


def _reduce_tensor_for_sglang(tensor: torch.Tensor) -> Any:
    """torch's ``reduce_tensor``; for a CUDA tensor the device index becomes its UUID and the
    rebuild function SGLang's patched one, as ``monkey_patch_torch_reductions`` makes the
    sender do (patch_torch.py:41-77)."""
    from torch.multiprocessing import reductions

    fn, args = reductions.reduce_tensor(tensor)
    if fn is reductions.rebuild_cuda_tensor:
        args = (*args[:CUDA_DEVICE_ARG_INDEX], cuda_device_uuid(args[CUDA_DEVICE_ARG_INDEX]),
                *args[CUDA_DEVICE_ARG_INDEX + 1:])
        fn = rebuild_cuda_tensor_by_uuid
    return fn, args


class SGLangForkingPickler(pickle._Pickler):
    """``ForkingPickler``'s reductions (tensors and storages by handle), with the classes of
    :data:`SGLANG_GLOBAL_NAMES` written under SGLang's names.

    The pure-Python pickler is used because the C one insists that a global's module attribute
    *is* the object, and SGLang's modules are not installed here. Its output is the same opcode
    stream ``ForkingPickler(buf).dump(obj)`` writes (and SGLang reads) otherwise."""

    def __init__(self, file: io.BytesIO):
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing.reductions  # noqa: F401  (registers the tensor reducers)

        super().__init__(file, protocol=PICKLE_PROTOCOL)
        table = ForkingPickler._copyreg_dispatch_table.copy()
        table.update(ForkingPickler._extra_reducers)
        for cls in (torch.Tensor, torch.nn.Parameter):
            table[cls] = _reduce_tensor_for_sglang
        self.dispatch_table = table

    def save_global(self, obj: Any, name: str | None = None) -> None:
        try:
            target = SGLANG_GLOBAL_NAMES.get(obj)
        except TypeError:  # unhashable
            target = None
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    # functions are dispatched to the base class's save_global directly; classes reach this
    # override through save_type
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[type(rebuild_cuda_tensor_by_uuid)] = save_global


def serialize_for_sglang(obj: Any, output_str: bool = True) -> str | bytes:
    """``MultiprocessingSerializer.serialize(obj, output_str)`` (srt/utils/common.py:3060-3082)
    for objects made of tensors, containers and the classes of :data:`SGLANG_GLOBAL_NAMES`.
    Tensors are shared, not copied: they must stay alive until the receiver has read them."""
    buf = io.BytesIO()
    SGLangForkingPickler(buf).dump(obj)
    data = buf.getvalue()
    return base64.b64encode(data).decode("utf-8") if output_str else data


def flattened_bucket(named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """SGLang's ``FlattenedTensorBucket`` dict form: every tensor's bytes in one uint8 tensor on
    the tensors' device, with :class:`FlattenedTensorMetadata` per tensor.

    SGLang packs back to back (tensor_bucket.py:39-76); here each tensor starts at a multiple of
    its item size so that the receiver's ``view(dtype)`` of its slice (tensor_bucket.py:118-130)
    is valid whatever the dtype order. The receiver reads only ``start_idx:end_idx``."""
    if not named:
        raise ValueError("Cannot create empty tensor bucket")
    pieces, metadata, offset = [], [], 0
    device = named[0][1].device
    for name, tensor in named:
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, the bucket on {device}")
        pad = -offset % tensor.element_size()
        if pad:
            pieces.append(torch.zeros(pad, dtype=torch.uint8, device=device))
            offset += pad
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        metadata.append(FlattenedTensorMetadata(name=name, shape=tensor.shape, dtype=tensor.dtype, start_idx=offset,
                                                end_idx=offset + flat.numel(), numel=flat.numel()))
        pieces.append(flat)
        offset += flat.numel()
    return {"flattened_tensor": torch.cat(pieces), "metadata": metadata}


def update_weights_from_tensor_body(payload: Any, tp_size: int = 1, load_format: str | None = None,
                                    weight_version: str | None = None, flush_cache: bool = True,
                                    abort_all_requests: bool = False) -> dict[str, Any]:
    """The JSON body of one ``/update_weights_from_tensor`` call (io_struct.py:2027-2047):
    ``payload`` serialised once and listed once per engine TP rank (each rank reads its own
    index: srt/managers/tp_worker.py:194-201)."""
    serialized = serialize_for_sglang(payload, output_str=True)
    return {"serialized_named_tensors": [serialized] * tp_size, "load_format": load_format,
            "flush_cache": flush_cache, "abort_all_requests": abort_all_requests, "weight_version": weight_version}


class TensorWeightSender:
    """Pushes weights to one colocated engine in memory and moves its memory out of the way.

    ``engine_url`` is the engine's base URL, ``bucket_bytes`` the most bytes per request,
    ``flattened_bucket`` picks SGLang's ``flattened_bucket`` load format (one uint8 tensor per
    request; the tensors are copied once into it) over the named-tensor list (no copy), and
    ``api_key`` is sent as ``Authorization: Bearer``. ``tp_size`` is the engine's TP size: every
    rank reads its own copy of the payload. The calls are synchronous and made from the trainer
    rank that holds the (gathered) HF-named tensors.
    """

    def __init__(self, engine_url: str, bucket_bytes: int = 512 << 20, flattened_bucket: bool = True,
                 api_key: str | None = None, tp_size: int = 1, timeout_s: float = 600.0):
        import httpx

        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        self.engine_url = engine_url.rstrip("/")
        self.bucket_bytes = int(bucket_bytes)
        self.flattened_bucket = bool(flattened_bucket)
        self.tp_size = int(tp_size)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.engine_url, headers=headers, timeout=timeout_s, trust_env=False)
        use_file_system_sharing()

    def close(self) -> None:
        """Close the HTTP connection."""
        self._http.close()

    def __enter__(self) -> "TensorWeightSender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        res = self._http.post(path, json=body)
        if res.status_code != 200:
            raise RuntimeError(f"{path} failed with HTTP {res.status_code}: {res.text[:2000]}")
        return res.json() if res.content else None

    def _control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self._post(path, body or {})
        if isinstance(reply, dict) and reply.get("success") is False:
            raise RuntimeError(f"{path} refused: {reply.get('message')}")
        return reply

    def release(self, tags: Sequence[str] | None = None) -> None:
        """``/release_memory_occupation``: the engine frees ``tags`` (None: weights, KV cache and
        CUDA graphs). SGLang requires the engine to be idle (pause or drain it first) and crashes
        otherwise (srt/managers/scheduler_components/weight_updater.py:337-341)."""
        self._post("/release_memory_occupation", {"tags": list(tags) if tags else None})

    def resume(self, tags: Sequence[str] | None = None) -> None:
        """``/resume_memory_occupation``: the engine takes ``tags`` back. After resuming
        ``weights`` their values are undefined (unless the engine backs them up on CPU): push
        the weights with :meth:`send` before generating."""
        self._post("/resume_memory_occupation", {"tags": list(tags) if tags else None})

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: str | None = None,
             flush_cache: bool = True) -> dict[str, float]:
        """Push every tensor in bucketed ``/update_weights_from_tensor`` calls inside one
        begin/end weight-update session; ``weight_version`` and the post-update cache flush ride
        on the last call (SGLang sets the version when a call succeeded: tokenizer_control_mixin.py:590-592).

        Returns ``{"bytes", "tensors", "requests", "seconds"}``. Raises ``RuntimeError`` on a refused call."""
        tic = time.perf_counter()
        stats = {"bytes": 0, "tensors": 0, "requests": 0}
        self._control("/begin_weight_update")
        try:
            pending: list[tuple[str, torch.Tensor]] | None = None
            for bucket in iter_buckets(named_tensors, self.bucket_bytes):  # refuses a name sent twice
                if pending is not None:
                    self._send_bucket(pending, None, False, stats)
                pending = bucket
            if pending is not None:
                self._send_bucket(pending, weight_version, flush_cache, stats)
        finally:
            self._control("/end_weight_update")
        stats["seconds"] = time.perf_counter() - tic
        return stats

    def _send_bucket(self, bucket: list[tuple[str, torch.Tensor]], weight_version: str | None, flush_cache: bool,
                     stats: dict[str, Any]) -> None:
        if self.flattened_bucket:
            payload: Any = flattened_bucket(bucket)
            load_format = FLATTENED_BUCKET
        else:
            payload = [(name, tensor.detach()) for name, tensor in bucket]
            load_format = None
        body = update_weights_from_tensor_body(payload, self.tp_size, load_format, weight_version, flush_cache)
        self._control("/update_weights_from_tensor", body)
        # the payload (and so the shared tensors) stays referenced until here: the engine has read it
        del payload
        stats["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
        stats["tensors"] += len(bucket)
        stats["requests"] += 1
