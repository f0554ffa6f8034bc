"""Stream weights between HF safetensors and a (possibly TP/PP-sharded) megatron model.

- :class:`HFWeightReader` opens ``model.safetensors`` or a sharded ``model.safetensors.index.json``
  lazily (memory-mapped): reading one tensor costs that tensor's memory only, and every
  missing / truncated file or wrongly shaped tensor is a named error.
- :func:`load_hf_into_model` fills this rank's model chunk one parameter at a time.
- :func:`export_hf_tensors` yields ``(hf_name, full tensor)`` for the whole model on every rank,
  gathering TP shards (all-gather) and PP stages (broadcast) one parameter at a time; the
  vocabulary padding is stripped. Conversion writes these.
- :func:`export_hf_tensors_to_replica_root` yields the same stream on the root rank of one
  data-parallel replica only, each shard moving once: only that replica takes part, and every TP
  rank of every pipeline stage sends its own shards point to point to the root. Weight sync sends
  these (:func:`export_hf_tensors_to_rank0`: the first replica, rooted at global rank 0).
- :class:`SafetensorsShardWriter` writes them as HF does (shards + index past a size limit).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .arch import ModelArch
from .mapping import ParamMap, expected_hf_shapes, global_to_hf, hf_to_global, local_param_map, merge_shards, \
    param_maps, shard

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, truncated, or holds a tensor of the wrong shape."""


class HFWeightReader:
    """Lazy access to the tensors of an HF checkpoint directory (safetensors only)."""

    def __init__(self, hf_dir: str | Path, arch: ModelArch | None = None):
        from safetensors import safe_open

        self.hf_dir = Path(hf_dir)
        index_path = self.hf_dir / SAFETENSORS_INDEX
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise WeightFileError(f"{index_path}: not a valid safetensors index ({err})") from err
        elif (self.hf_dir / SAFETENSORS_SINGLE).is_file():
            weight_map = None  # filled below from the single file
        else:
            bins = sorted(p.name for p in self.hf_dir.glob("*.bin"))
            hint = f" (found {bins[0]}: re-save the model with safe_serialization=True)" if bins else ""
            raise WeightFileError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {self.hf_dir}{hint}")
        self._handles = {}
        files = sorted(set(weight_map.values())) if weight_map else [SAFETENSORS_SINGLE]
        for fname in files:
            path = self.hf_dir / fname
            if not path.is_file():
                raise WeightFileError(f"weight file {path} listed in {SAFETENSORS_INDEX} is missing")
            try:
                self._handles[fname] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types for truncated headers
                raise WeightFileError(f"cannot read {path}: {err}") from err
        if weight_map is None:
            weight_map = {k: SAFETENSORS_SINGLE for k in self._handles[SAFETENSORS_SINGLE].keys()}
        self.weight_map = weight_map
        self._expected = expected_hf_shapes(arch) if arch is not None else {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def dtype(self) -> torch.dtype:
        """Storage dtype of the checkpoint (that of its embedding)."""
        return self.get("model.embed_tokens.weight").dtype

    def check_complete(self) -> None:
        """Raise naming the first tensor the architecture needs that no file holds."""
        missing = [n for n in self._expected if n not in self.weight_map]
        if missing:
            raise WeightFileError(f"{self.hf_dir}: tensor {missing[0]!r} is missing "
                                  f"({len(missing)} missing in all)")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, shape-checked against the architecture."""
        fname = self.weight_map.get(name)
        if fname is None:
            raise WeightFileError(f"{self.hf_dir}: tensor {name!r} is missing")
        try:
            tensor = self._handles[fname].get_tensor(name)
        except Exception as err:
            raise WeightFileError(f"{self.hf_dir / fname}: cannot read tensor {name!r} "
                                  f"(truncated or corrupt file?): {err}") from err
        expected = self._expected.get(name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise WeightFileError(f"{self.hf_dir / fname}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {expected} from config.json")
        return tensor


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


@torch.no_grad()
def load_hf_into_model(model: torch.nn.Module, arch: ModelArch, reader: HFWeightReader) -> None:
    """Copy HF weights into this rank's megatron model chunk (TP shard, PP stage), tensor by tensor."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        pm = local_param_map(arch, name, offset)  # a tied output layer maps to the embedding
        full = hf_to_global(arch, pm, [reader.get(n) for n in pm.hf_names])
        padded_vocab = param.shape[0] * tp if pm.kind == "vocab" else 0
        local = shard(pm, full, tp_rank, tp, padded_vocab)
        if local.shape != param.shape:
            raise WeightFileError(f"{name}: HF weights give a shard of shape {tuple(local.shape)}, "
                                  f"the model expects {tuple(param.shape)}")
        param.copy_(local.to(param.dtype))


def _owner_stage(pm: ParamMap, arch: ModelArch, pp: int) -> int:
    if pm.layer is not None:
        return pm.layer // (arch.num_layers // pp)
    return 0 if pm.megatron_name.startswith("embedding.") else pp - 1


@torch.no_grad()
def _exported_params(model: torch.nn.Module, arch: ModelArch) -> dict[str, tuple[Any, torch.Tensor]]:
    """This stage's parameters by stage-independent megatron name, with their mapping (a tied
    output layer is left out: the embedding is exported and the last stage's copy equals it)."""
    offset = layer_offset(model)
    params = {}
    for name, param in model.named_parameters():
        pm = local_param_map(arch, name, offset)
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        params[pm.megatron_name] = (pm, param)
    return params


def export_hf_tensors(model: torch.nn.Module, arch: ModelArch,
                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every HF tensor of the model, full and unpadded, in ``dtype``, on every rank (a collective).

    ``dtype`` defaults to the model's ``params_dtype`` (megatron keeps some norms in fp32 even in
    a bf16 model; they are cast back). All ranks must consume the generator to the end.
    Memory: one full tensor at a time.
    """
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    local_params = {name: (pm, param) for name, (pm, param) in _exported_params(model, arch).items()}
    device = next(model.parameters()).device
    out_dtype = dtype or model.config.params_dtype
    hf_shapes = expected_hf_shapes(arch)
    for pm in param_maps(arch):
        owner = _owner_stage(pm, arch, pp)
        full = None
        if owner == pp_rank:
            _, param = local_params[pm.megatron_name]
            data = param.detach()
            if tp > 1 and pm.kind != "replicated":
                shards = [torch.empty_like(data) for _ in range(tp)]
                dist.all_gather(shards, data.contiguous(), group=tp_group)
            else:
                shards = [data] * tp
            full = merge_shards(pm, shards, arch.vocab_size).to(out_dtype)
        if pp > 1:
            if full is None:
                full = torch.empty(_global_shape(pm, hf_shapes), dtype=out_dtype, device=device)
            dist.broadcast(full, src=dist.get_global_rank(pp_group, owner), group=pp_group)
        for hf_name, tensor in zip(pm.hf_names, global_to_hf(arch, pm, full)):
            yield hf_name, tensor


def _replica_coordinates(device: torch.device) -> dict[tuple[int, int], int]:
    """{(pipeline stage, TP rank): global rank} of this rank's model-parallel replica (a small
    all-gather over the replica's TP x PP group)."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    mine = torch.tensor([ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()],
                        dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    return {(int(c[0]), int(c[1])): ranks[i] for i, c in enumerate(everyone)}


def export_hf_tensors_to_rank0(model: torch.nn.Module, arch: ModelArch,
                               dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every HF tensor of the model, full and unpadded, in ``dtype``, on global rank 0 only:
    :func:`export_hf_tensors_to_replica_root` of the first data-parallel replica, whose root must
    be global rank 0 (megatron's default rank order puts it there)."""
    return export_hf_tensors_to_replica_root(model, arch, replica=0, dtype=dtype)


@torch.no_grad()
def export_hf_tensors_to_replica_root(model: torch.nn.Module, arch: ModelArch, replica: int = 0,
                                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every HF tensor of the model, full and unpadded, in ``dtype``, on the root (TP rank 0
    of pipeline stage 0) of data-parallel replica ``replica`` only.

    ``replica`` is a data-parallel rank counted with context parallelism
    (``get_data_parallel_rank(with_context_parallel=True)``). A collective over that replica:
    every rank calls it and consumes the generator to the end; on every rank but the root it
    yields nothing. Ranks of the other replicas hold copies of the same parameters and return at
    once without communicating. In the replica, for each parameter in HF order, each TP rank of
    the stage that owns it sends its shard (cast to ``dtype``) to the root (``dist.send``; a
    replicated tensor, such as a norm, only from TP rank 0), and the root merges the shards as
    :func:`export_hf_tensors` does. Every shard crosses the network once; no stage receives
    another stage's tensors. Several replicas may export at once (colocated engines on several
    nodes, each fed by the replica on its node): their ranks are disjoint.

    Memory on the root: the TP shards of one parameter and their merge.
    """
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank(with_context_parallel=True) != replica:
        return
    rank = dist.get_rank()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    local_params = {name: param for name, (_, param) in _exported_params(model, arch).items()}
    device = next(model.parameters()).device
    out_dtype = dtype or model.config.params_dtype
    coordinates = _replica_coordinates(device)
    root = coordinates[(0, 0)]
    if replica == 0 and root != 0:
        raise RuntimeError(f"global rank 0 is not TP rank 0 of pipeline stage 0 of the first replica (rank {root} "
                           "is), as megatron's default rank order puts it")
    if rank != root:
        for pm in param_maps(arch):
            if _owner_stage(pm, arch, pp) == pp_rank and (pm.kind != "replicated" or tp_rank == 0):
                dist.send(local_params[pm.megatron_name].detach().to(out_dtype).contiguous(), dst=root)
        return
    hf_shapes = expected_hf_shapes(arch)
    # every stage pads the vocabulary alike: the root's embedding shard gives the padded size
    padded_vocab = local_params["embedding.word_embeddings.weight"].shape[0] * tp
    for pm in param_maps(arch):
        owner = _owner_stage(pm, arch, pp)
        senders = [0] if pm.kind == "replicated" else list(range(tp))
        local_shape = shard(pm, torch.empty(_global_shape(pm, hf_shapes), device="meta"), 0, tp, padded_vocab).shape
        shards: list[torch.Tensor] = []
        pending = []
        for j in senders:
            if owner == 0 and j == 0:
                shards.append(local_params[pm.megatron_name].detach().to(out_dtype))
                continue
            buffer = torch.empty(local_shape, dtype=out_dtype, device=device)
            pending.append(dist.irecv(buffer, src=coordinates[(owner, j)]))
            shards.append(buffer)
        for work in pending:
            work.wait()
        full = merge_shards(pm, shards, arch.vocab_size)  # a replicated tensor: its one copy
        for hf_name, tensor in zip(pm.hf_names, global_to_hf(arch, pm, full)):
            yield hf_name, tensor


def _global_shape(pm: ParamMap, hf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the global (unpadded) megatron tensor of ``pm``, from its HF tensors' shapes."""
    parts = [hf_shapes[n] for n in pm.hf_names]
    if pm.kind in ("qkv", "fc1"):
        return (sum(p[0] for p in parts), *parts[0][1:])
    return parts[0]


class SafetensorsShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``.

    A single ``model.safetensors`` (no index) when everything fits in one shard, as HF does.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        tensor = tensor.detach().to("cpu").contiguous()
        if any(t.data_ptr() == tensor.data_ptr() for t in self._pending.values()):
            tensor = tensor.clone()  # safetensors refuses tensors that share memory in one file
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        idx = len(self._files)
        save_file(self._pending, str(self.out_dir / f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the files as HF does, write the index; return file names."""
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            (self.out_dir / "shard-00000.tmp").rename(self.out_dir / SAFETENSORS_SINGLE)
            return [SAFETENSORS_SINGLE]
        names, weight_map = [], {}
        for i, tensor_names in enumerate(self._files):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / fname)
            names.append(fname)
            weight_map.update({t: fname for t in tensor_names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        return names
