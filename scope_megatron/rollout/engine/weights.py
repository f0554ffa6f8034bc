"""The embedded engine's weight-update protocol: sessions, broadcast groups, loads, versions.

- :func:`load_weights_sglang_rules` writes named tensors into the model by the per-name rules of
  SGLang 0.5.23's ``load_weights`` for the llama / qwen2 / qwen3 families: an unknown name is
  only a logged warning, a wrong shape fails after the earlier names were written.
- :func:`receive_broadcast` receives one ``update_weights_from_distributed`` call's tensors,
  one by one or as one flattened bucket (``protocol.flattened_bucket_layout``, the layout the
  trainer's ``weight_transfer.flatten_bucket`` sends).
- :func:`deserialize_tensor_payload` decodes one ``update_weights_from_tensor`` entry with the
  restrictions of SGLang's unpickler.
- :class:`WeightUpdates` is the engine's side of SGLang's update endpoints (from disk, from a
  broadcast group, from in-memory tensors, begin/end sessions, ``get_weights_by_name``, and the
  release / resume of the weights' and KV cache's memory for colocated engines).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ..protocol import ProtocolError, flattened_bucket_layout
from ..tensor_transport import (FLATTENED_BUCKET, GPU_MEMORY_ALL_TYPES, GPU_MEMORY_TYPE_KV_CACHE,
                                GPU_MEMORY_TYPE_WEIGHTS, SGLANG_GLOBAL_NAMES, LocalSerializedTensor)
from .request import EngineError, EngineFatal

logger = logging.getLogger(__name__)

SESSION_REQUIRED_MESSAGE = ("{op} must run between begin_weight_update() and end_weight_update()")
# SGLang 0.5.23 srt/managers/scheduler_components/weight_updater.py:123-127
FLUSH_FAILED_AFTER_UPDATE = ("Weights were updated, but the cache was not flushed because requests are still "
                             "running or queued. Retract or finish them, then call /flush_cache.")
# the stacked-parameter shards of SGLang's load_weights (models/qwen3.py:687-694, qwen2.py:652-659,
# llama.py:709-716 with a leading dot)
STACKED_SHARD_NAMES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def layer_id(name: str) -> int | None:
    """The layer index in ``...layers.N...`` (SGLang's ``get_layer_id``), or None."""
    match = re.search(r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def stacked_name(name: str) -> str:
    """The fused parameter name SGLang looks up for a shard name (``q_proj`` -> ``qkv_proj``)."""
    for shard, fused in (("q_proj", "qkv_proj"), ("k_proj", "qkv_proj"), ("v_proj", "qkv_proj"),
                         ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj")):
        if shard in name:
            return name.replace(shard, fused)
    return name


def iter_safetensors_dir(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every ``*.safetensors`` file in ``path``, file by file."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"Cannot find any model weights with `{path}`")
    for f in files:
        yield from load_file(str(f)).items()


def load_weights_sglang_rules(model: torch.nn.Module, hf_config: Any, named: list[tuple[str, torch.Tensor]]) -> None:
    """Write ``named`` tensors in order by SGLang's per-name rules (legacy ``load_weights``).

    SGLang 0.5.23 srt/models/qwen3.py:686-760, qwen2.py:651-719, llama.py:708-779:
    - names of layers past the model's, ``rotary_emb.inv_freq``, ``projector`` and the
      ``rotary_emb.cos/sin_cached`` tensors are skipped silently, as is a ``.bias`` the model
      lacks (and, for llama, ``lm_head.weight`` of a tied model);
    - a name the model lacks is only ``logger.warning("Parameter X not found in params_dict")``;
      for qwen3 a stacked-shard name (``q_proj`` ...) the model lacks raises ``KeyError``;
    - a wrong shape raises ``AssertionError`` (model_loader/weight_utils.py:1582-1585,
      layers/linear.py:579-581) after the earlier names were written: a partial update.
    ``params_dict`` is ``named_parameters()``, so the tied ``lm_head.weight`` is not in it.
    """
    family = getattr(hf_config, "model_type", "")
    params = dict(model.named_parameters())
    num_layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, tensor in named:
            layer = layer_id(name)
            if layer is not None and num_layers and layer >= num_layers:
                continue
            if "rotary_emb.inv_freq" in name or "projector" in name:
                continue
            if "rotary_emb.cos_cached" in name or "rotary_emb.sin_cached" in name:
                continue
            if family == "llama" and tied and "lm_head.weight" in name:
                continue
            stacked = any((f".{s}" if family == "llama" else s) in name for s in STACKED_SHARD_NAMES)
            if name.endswith(".bias") and name not in params:
                continue
            if name not in params:
                if stacked and family == "qwen3":
                    raise KeyError(stacked_name(name))
                logger.warning(f"Parameter {stacked_name(name) if stacked else name} not found in params_dict")
                continue
            param = params[name]
            if param.numel() == 1 and tensor.numel() == 1:
                param.data.fill_(tensor.item())
                continue
            if tuple(param.shape) != tuple(tensor.shape):
                raise AssertionError(f"Attempted to load weight ({tensor.size()}) into parameter ({param.size()})")
            param.data.copy_(tensor.to(device=param.device, dtype=param.dtype))


def receive_broadcast(names: list[str], dtypes: list[str], shapes: list[list[int]], group: Any,
                      load_format: str | None, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Receive one broadcast from group rank 0 onto ``device`` (SGLang 0.5.23
    srt/model_executor/model_runner_components/weight_updater.py:254-300)."""
    import torch.distributed as dist

    if load_format == "flattened_bucket":
        layout = flattened_bucket_layout(names, dtypes, shapes)
        buffer = torch.empty(layout[-1][3] + layout[-1][4], dtype=torch.uint8, device=device)
        dist.broadcast(buffer, src=0, group=group)
        return [(name, buffer[off:off + size].view(dt).reshape(shape)) for name, dt, shape, off, size in layout]
    received, handles = [], []
    for name, dtype, shape in zip(names, dtypes, shapes):  # zip, not strict: as there
        dt = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        t = torch.empty(shape, dtype=dt, device=device)
        handles.append(dist.broadcast(t, src=0, group=group, async_op=True))
        received.append((name, t))
    for h in handles:
        h.wait()
    return received


# ---------------------------------------------------------------------------- in-memory tensors
# SGLang 0.5.23 srt/utils/common.py:3160-3372 (SafeUnpickler.ALLOWED_GLOBALS): plain containers,
# torch dtypes, Size, device, tensor/storage classes and torch's rebuild functions; no code module
_ALLOWED_BUILTINS = {"bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "range",
                     "set", "slice", "str", "tuple"}
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "deque"),
    ("collections", "Counter"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"),
    ("copyreg", "_reconstructor"), ("functools", "partial"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
    ("torch.nn.parameter", "Parameter"), ("torch.serialization", "_get_layout"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"), ("torch._utils", "_rebuild_wrapper_subclass"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"), ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
    ("torch", "UntypedStorage"),
    *(("torch.multiprocessing.reductions", n) for n in (
        "rebuild_tensor", "rebuild_meta_tensor", "rebuild_cuda_tensor", "rebuild_nested_tensor",
        "rebuild_sparse_coo_tensor", "rebuild_sparse_compressed_tensor", "rebuild_storage_fd",
        "rebuild_storage_filename", "rebuild_storage_empty", "rebuild_typed_storage", "rebuild_typed_storage_child")),
}
# SGLang's own classes in the list, resolved to this package's field-for-field equivalents
_SGLANG_CLASSES = {target: local for local, target in SGLANG_GLOBAL_NAMES.items()}


class SGLangSafeUnpickler(pickle.Unpickler):
    """SGLang's ``SafeUnpickler`` (srt/utils/common.py:3160-3372): any other global is refused
    with its message. Its ``*Tensor`` / ``*Storage`` class names of ``torch`` / ``torch.cuda``
    and the dtype names are allowed by pattern, the rest by the list above."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SGLANG_CLASSES:
            return _SGLANG_CLASSES[(module, name)]
        allowed = (
            (module == "builtins" and name in _ALLOWED_BUILTINS)
            or (module, name) in _ALLOWED_GLOBALS
            or (module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse")
                and (name.endswith("Tensor") or name.endswith("Storage")))
            or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.qscheme)))
        )
        if allowed:
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def decode_serialized_entry(entry: Any, index: int) -> bytes:
    """One ``serialized_named_tensors`` entry of the JSON body as bytes: a base64 string, decoded
    strictly (SGLang's ``Base64Bytes`` field validator, srt/utils/msgspec_utils.py:12-35, a 422 there)."""
    if not isinstance(entry, str):
        raise ProtocolError(f"serialized_named_tensors[{index}]: expected a base64 string, got {type(entry).__name__}")
    try:
        return base64.b64decode(entry, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"serialized_named_tensors[{index}]: Expected base64-encoded bytes") from exc


def deserialize_tensor_payload(data: bytes | str) -> Any:
    """``MultiprocessingSerializer.deserialize`` (srt/utils/common.py:3084-3099): base64 text or
    raw bytes, read by :class:`SGLangSafeUnpickler`."""
    if isinstance(data, str):
        data = base64.b64decode(data, validate=True)
    return SGLangSafeUnpickler(io.BytesIO(data)).load()


def unpack_tensor_payload(payload: Any, load_format: str | None, tp_rank: int, device: torch.device
                          ) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of one decoded payload, as SGLang's model runner reads it
    (srt/model_executor/model_runner_components/weight_updater.py:343-409): the flattened-bucket
    dict's slices (left where the sender's tensor lives), or the listed tensors, each
    :class:`LocalSerializedTensor` resolved for ``tp_rank``, moved to ``device``. An unknown
    ``load_format`` raises ``NotImplementedError``; a malformed payload fails as Python does
    on it there (``KeyError``, ``TypeError``, ``ValueError``)."""
    if load_format == FLATTENED_BUCKET:
        flat = payload["flattened_tensor"]
        named = []
        for meta in payload["metadata"]:
            # FlattenedTensorBucket.reconstruct_tensors (srt/weight_sync/tensor_bucket.py:118-130)
            named.append((meta.name, flat[meta.start_idx:meta.end_idx].view(meta.dtype).reshape(meta.shape)))
        return named
    if load_format not in (None, "direct"):
        # custom loaders (dotted import paths listed by --custom-weight-loader) are not supported here
        raise NotImplementedError(f"Unknown load_format={load_format}")
    named = []
    for name, tensor in payload:
        if isinstance(tensor, LocalSerializedTensor):
            tensor = tensor.get(tp_rank)
        named.append((name, tensor.to(device)))
    return named


class WeightUpdates:
    """The weight-update endpoints of an engine; mixed into :class:`~.embedded.EmbeddedEngine`.

    Uses the host's ``model``, ``hf_config``, ``device`` and ``model_path`` and its scheduler
    (:class:`~.scheduler.Scheduler`: ``exclusive``, ``abort``, ``flush_cache``, the two weight
    versions). Owns the open session flag and the broadcast groups by name. Each update returns
    ``(success, message)`` as SGLang's reply does."""

    def _init_weight_updates(self) -> None:
        self._session_open = False
        self._groups: dict[str, Any] = {}
        # SGLang's offload_tags (srt/managers/scheduler_components/weight_updater.py:96)
        self._offload_tags: set[str] = set()
        # parameter name -> its values kept on release (enable_weights_cpu_backup) or None
        self._weights_backup: dict[str, torch.Tensor] | None = None
        self._released_params: dict[str, tuple[torch.Size, torch.dtype]] = {}

    def destroy_groups(self) -> None:
        """Tear down every broadcast group (engine shutdown)."""
        from ..dist_group import destroy_weight_update_group

        for group in list(self._groups.values()):
            destroy_weight_update_group(group)
        self._groups.clear()

    @contextmanager
    def _session_call(self) -> Iterator[None]:
        """begin/end_weight_update take the writer lock unless paused
        (SGLang 0.5.23 srt/managers/tokenizer_control_mixin.py:466-478)."""
        with self.exclusive():
            yield

    def named_weights(self) -> dict[str, torch.Tensor]:
        """HF-named parameters and persistent buffers (tied names included)."""
        return dict(self.model.state_dict(keep_vars=True))

    def _after_load(self, weight_version: str | None, flush_cache: bool, message: str) -> tuple[bool, str]:
        """Shared tail of a successful load: scheduler version, post-update flush, then the
        tokenizer-side version only when the whole call succeeded.

        SGLang 0.5.23 srt/managers/scheduler_components/weight_updater.py:118-127,234-238 and
        tokenizer_control_mixin.py:525-531."""
        self.record_scheduler_version(weight_version)
        success = True
        if flush_cache and not self.flush_cache(0):
            logger.warning("Cache not flushed because there are pending requests")
            success, message = False, FLUSH_FAILED_AFTER_UPDATE
        if success and weight_version is not None:
            self.weight_version = weight_version
            message += f" Weight version updated to {weight_version}."
        return success, message

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                 abort_all_requests: bool = False, flush_cache: bool = True) -> tuple[bool, str]:
        """Load the weights in ``model_path``'s safetensors files; returns (success, message).

        As SGLang 0.5.23 (srt/model_executor/model_runner_components/weight_updater.py:172-252):
        the files may hold any subset of the weights; unknown names are warnings. A tensor that
        does not fit makes the load fail, and the roll-back re-reads the *new* path (the model
        config's path was already replaced, :199), fails the same way outside any handler and
        the scheduler process dies: :class:`EngineFatal`."""
        if abort_all_requests:
            self.abort(abort_all=True)
        with self.exclusive():
            try:
                named = list(iter_safetensors_dir(model_path))
            except Exception as exc:
                return False, f"Failed to get weights iterator: {exc}."
            try:
                load_weights_sglang_rules(self.model, self.hf_config, named)
            except Exception as exc:
                logger.error("Failed to update weights: %s. Rolling back to original weights.", exc)
                raise EngineFatal(f"the weight update from {model_path} failed ({exc}) and so did its roll-back, "
                                  "which re-reads the same files; the scheduler process died") from exc
            self.model_path = str(model_path)
            return self._after_load(weight_version, flush_cache, "Succeeded to update model weights.")

    def begin_weight_update(self) -> tuple[bool, str]:
        """Open a weight-update session (SGLang 0.5.23
        srt/managers/scheduler_components/weight_updater.py:306-319)."""
        with self._session_call():
            if self._session_open:
                return False, "a weight-update session is already open; call end_weight_update() first"
            self._session_open = True
            return True, "Success"

    def end_weight_update(self) -> tuple[bool, str]:
        """Close the weight-update session (weight_updater.py:321-332 there)."""
        with self._session_call():
            if not self._session_open:
                return False, "no weight-update session is open; call begin_weight_update() first"
            self._session_open = False
            return True, "Success"

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str) -> tuple[bool, str]:
        """Join the trainer's broadcast group as rank ``rank_offset`` (one TP rank here).

        As SGLang 0.5.23 (srt/model_executor/model_runner_components/weight_updater.py:99-144) the
        group is built by the rendezvous + ``_new_process_group_helper`` path, so a name that was
        already created fails in torch (``The specified group name has already been created``,
        torch/distributed/distributed_c10d.py) after the rendezvous, and the old group stays."""
        from ..dist_group import init_weight_update_group

        if backend == "nccl" and self.device.type != "cuda":
            return False, "Failed to initialize custom process group: backend 'nccl' needs a GPU engine; use 'gloo' on CPU."
        try:
            group = init_weight_update_group(master_address, master_port, rank_offset, world_size,
                                             group_name=group_name, backend=backend)
        except Exception as exc:
            message = f"Failed to initialize custom process group: {exc}."
            logger.error(message)
            return False, message
        self._groups[group_name] = group
        return True, "Succeeded to initialize custom process group."

    def destroy_weights_update_group(self, group_name: str) -> tuple[bool, str]:
        """Tear down a group made by :meth:`init_weights_update_group` (weight_updater.py:146-157 there)."""
        from ..dist_group import destroy_weight_update_group

        group = self._groups.pop(group_name, None)
        if group is None:
            return False, "The group to be destroyed does not exist."
        destroy_weight_update_group(group)
        return True, "Succeeded to destroy custom process group."

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, weight_version: str | None = None,
                                        load_format: str | None = None, abort_all_requests: bool = False,
                                        flush_cache: bool = True) -> tuple[bool, str]:
        """Receive tensors broadcast from group rank 0, in list order, and load them; (success, message).

        SGLang 0.5.23 srt/managers/scheduler_components/weight_updater.py:196-241 (session, receive,
        load, version, flush) and model_runner_components/weight_updater.py:322-339 (load failure)."""
        with self._cond:
            if not self._session_open:
                return False, SESSION_REQUIRED_MESSAGE.format(op="update_weights_from_distributed")
        if abort_all_requests:
            self.abort(abort_all=True)
        with self.exclusive():
            self.check_memory_resident("update_weights_from_distributed")
            try:
                if group_name not in self._groups:
                    raise AssertionError(f"Group {group_name} not in {list(self._groups)}. "
                                         "Please call `init_weights_update_group` first.")
                received = receive_broadcast(names, dtypes, shapes, self._groups[group_name], load_format,
                                             self.device)
            except Exception as exc:
                message = f"Failed to receive weights: {exc}"
                logger.error(message)
                return False, message
            try:
                load_weights_sglang_rules(self.model, self.hf_config, received)
            except Exception as exc:
                message = (f"Failed to update parameter online: {exc}. The full weights of the ModelRunner are "
                           "partially updated. Please discard the whole weights.")
                logger.error(message)
                return False, message
            return self._after_load(weight_version, flush_cache, "Succeeded to update parameter online.")

    # ------------------------------------------------------------------ colocated memory
    @property
    def memory_released(self) -> set[str]:
        """The tags whose memory is released now (only with ``enable_memory_saver``: without it a
        release frees nothing, as SGLang's no-op adapter, srt/utils/torch_memory_saver_adapter.py:143-160)."""
        return set(self._offload_tags) if self.config.enable_memory_saver else set()

    def check_memory_resident(self, op: str) -> None:
        """Refuse ``op`` on released weights or KV cache the way SGLang fails on it: the kernels
        touch unmapped device memory (torch_memory_saver keeps the addresses, drops the pages), the
        scheduler raises and takes the server down (srt/managers/scheduler.py:6370-6373)."""
        released = self.memory_released & {GPU_MEMORY_TYPE_WEIGHTS, GPU_MEMORY_TYPE_KV_CACHE}
        if released:
            raise EngineFatal(f"{op} ran while the memory of {sorted(released)} was released; on SGLang the "
                              "kernels touch unmapped device memory and the scheduler process dies. "
                              "Call /resume_memory_occupation first.")

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """``/release_memory_occupation`` (SGLang 0.5.23 srt/managers/scheduler_components/weight_updater.py:337-381).

        The engine must be fully idle (queued requests are allowed while the scheduler is paused
        by ``retract`` / ``in_place``); otherwise SGLang's assertion kills the scheduler:
        :class:`EngineFatal`. No tags (or an empty list) means every tag. With
        ``enable_memory_saver`` the parameters' storage is freed (``weights``; the buffers, SGLang's
        stashed "static state", stay), ``kv_cache`` flushes the cache; without it nothing is freed."""
        with self._cond:
            if not self._fully_idle():
                raise EngineFatal("AssertionError: release_memory_occupation should be called only when server is idle.")
        tags = list(tags) if tags else list(GPU_MEMORY_ALL_TYPES)
        self._offload_tags.update(tags)
        if not self.config.enable_memory_saver:
            logger.warning("release_memory_occupation frees nothing: the engine runs without enable_memory_saver")
            return
        if GPU_MEMORY_TYPE_KV_CACHE in tags:
            self.flush_cache(0)
        if GPU_MEMORY_TYPE_WEIGHTS in tags and not self._released_params:
            with self._model_lock, torch.no_grad():
                params = dict(self.model.named_parameters())
                if self.config.enable_weights_cpu_backup:
                    self._weights_backup = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
                for name, param in params.items():
                    self._released_params[name] = (param.shape, param.dtype)
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            logger.info("released the memory of %d parameters", len(self._released_params))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """``/resume_memory_occupation`` (weight_updater.py:383-420 there). A tag that is not released
        fails SGLang's ``offload_tags.remove`` and kills the scheduler: :class:`EngineFatal`.

        Resumed weights hold undefined values in SGLang unless it runs with
        ``--enable-weights-cpu-backup`` (torch_memory_saver maps fresh pages); here they are zeros
        (or the backup), so generating before the next weight push gives garbage either way."""
        tags = list(tags) if tags else list(GPU_MEMORY_ALL_TYPES)
        for tag in tags:
            if tag not in self._offload_tags:
                raise EngineFatal(f"KeyError: {tag!r} (resume_memory_occupation of memory that is not released)")
            self._offload_tags.remove(tag)
        if GPU_MEMORY_TYPE_WEIGHTS in tags and self._released_params:
            with self._model_lock, torch.no_grad():
                params = dict(self.model.named_parameters())
                backup = self._weights_backup or {}
                for name, (shape, dtype) in self._released_params.items():
                    if name in backup:
                        params[name].data = backup[name].to(self.device)
                    else:
                        params[name].data = torch.zeros(shape, dtype=dtype, device=self.device)
            self._released_params.clear()
            self._weights_backup = None
            logger.info("resumed the memory of the weights (%s)",
                        "restored from the CPU backup" if self.config.enable_weights_cpu_backup else "values undefined")

    def update_weights_from_tensor(self, serialized_named_tensors: list[bytes], load_format: str | None = None,
                                   flush_cache: bool = True, abort_all_requests: bool = False,
                                   weight_version: str | None = None) -> tuple[bool, str]:
        """Load tensors handed over in memory (one serializer payload per TP rank); (success, message).

        SGLang 0.5.23: the tokenizer manager aborts if asked and takes the writer lock unless
        paused (srt/managers/tokenizer_control_mixin.py:563-598); the scheduler refuses outside a
        session, reads only its own rank's entry (srt/managers/tp_worker.py:194-201; extra entries
        are never read), loads, records the version and flushes
        (scheduler_components/weight_updater.py:232-258). None of the decode or load steps is
        guarded there: no entry for this rank, a refused pickle global, a payload of the wrong
        form, an unknown ``load_format`` or a tensor that does not fit raises in the scheduler and
        the server dies (:class:`EngineFatal`). Unknown names are only warnings (``load_weights``)."""
        if abort_all_requests:
            self.abort(abort_all=True)
        with self._cond:
            if not self._session_open:
                return False, SESSION_REQUIRED_MESSAGE.format(op="update_weights_from_tensor")
        with self.exclusive():
            self.check_memory_resident("update_weights_from_tensor")
            tp_rank = 0  # the embedded engine is one TP rank
            try:
                payload = deserialize_tensor_payload(serialized_named_tensors[tp_rank])
                named = unpack_tensor_payload(payload, load_format, tp_rank, self.device)
                if load_format == "direct":
                    # _model_load_weights_direct (weight_updater.py:438-441): every name must exist
                    params = dict(self.model.named_parameters())
                    with torch.no_grad():
                        for name, tensor in named:
                            param = params[name]
                            if tuple(param.shape) != tuple(tensor.shape):
                                raise AssertionError(f"Attempted to load weight ({tensor.size()}) into parameter "
                                                     f"({param.size()})")
                            param.data.copy_(tensor.to(dtype=param.dtype))
                else:
                    load_weights_sglang_rules(self.model, self.hf_config, named)
            except Exception as exc:
                logger.error("update_weights_from_tensor failed: %r", exc)
                raise EngineFatal(f"update_weights_from_tensor raised {type(exc).__name__}: {exc}; on SGLang this "
                                  "is unguarded in the scheduler, whose process dies") from exc
            finally:
                payload = named = None  # drop the shared tensors before replying
            return self._after_load(weight_version, flush_cache, "Success")

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[float]:
        """The first ``truncate_size`` values of weight ``name`` (flattened)."""
        self.check_memory_resident("get_weights_by_name")
        targets = self.named_weights()
        if name not in targets:
            raise EngineError(f"unknown weight name {name!r}")
        return targets[name].detach().flatten()[:truncate_size].float().cpu().tolist()
