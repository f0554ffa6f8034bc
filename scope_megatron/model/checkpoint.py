"""The converted-checkpoint format and atomic output directories.

A scope-megatron model checkpoint is a directory::

    CKPT_DIR/
      scope_megatron.json   format version, architecture, storage dtype, where it came from
      hf/                   the HF config.json (+ generation_config.json, tokenizer files)
      model/                megatron-core dist_checkpointing (torch_dist) of the model; it loads
                            under any TP / PP layout (keys and global shapes are layout-free)

Every writer goes through :func:`atomic_output_dir`: files are written to ``OUT.partial``
and renamed to ``OUT`` only when complete, so a crash never leaves a half-written ``OUT``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .arch import ModelArch, arch_from_hf_config

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "scope_megatron.json"
HF_SUBDIR = "hf"
MODEL_SUBDIR = "model"
# Files copied next to config.json so export can rebuild a complete HF directory.
HF_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class OutputExistsError(FileExistsError):
    """The output directory already exists (we never overwrite)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()



def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an older ``final`` (kept as
    ``final.old`` until the new one is in place)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)

@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block succeeds (all ranks).

    Fails with :class:`OutputExistsError` if ``out_dir`` exists and ``overwrite`` is False. On an
    exception the temporary directory is removed and ``out_dir`` is untouched.
    """
    out = Path(out_dir).resolve()
    tmp = out.with_name(out.name + ".partial")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} already exists; choose another --out or remove it")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an earlier crashed run of ours
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
        _barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _rank() == 0:
        replace_dir(tmp, out)
    _barrier()


def write_meta(ckpt_dir: Path, arch: ModelArch, hf_source_dir: str | Path | None, dtype: torch.dtype,
               extra: dict[str, Any] | None = None) -> None:
    """Write ``scope_megatron.json`` and copy the HF side files (rank 0 only)."""
    if _rank() != 0:
        return
    meta = {"format_version": FORMAT_VERSION, "arch": arch.to_dict(), "dtype": str(dtype).removeprefix("torch."),
            "hf_source": str(hf_source_dir) if hf_source_dir else None, **(extra or {})}
    (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    if hf_source_dir is not None:
        hf_out = ckpt_dir / HF_SUBDIR
        hf_out.mkdir(exist_ok=True)
        for name in HF_SIDE_FILES:
            src = Path(hf_source_dir) / name
            if src.is_file():
                shutil.copy2(src, hf_out / name)


def read_meta(ckpt_dir: str | Path) -> tuple[ModelArch, dict[str, Any]]:
    """The architecture (re-validated from the stored HF config) and the metadata of a checkpoint."""
    ckpt = Path(ckpt_dir)
    meta_path = ckpt / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a scope-megatron checkpoint (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    hf_config = json.loads((ckpt / HF_SUBDIR / "config.json").read_text())
    return arch_from_hf_config(hf_config), meta


def export_hf_dir(model: torch.nn.Module, arch: ModelArch, out_dir: str | Path, side_dir: str | Path | None,
                  max_shard_bytes: int = 5 * 1024**3, overwrite: bool = False) -> list[str]:
    """Write ``model``'s weights as an HF directory, atomically; returns the safetensors file names.

    Every rank gathers (:func:`.hf_io.export_hf_tensors`); rank 0 writes the shards (at most
    ``max_shard_bytes`` each, an index past one) and copies the :data:`HF_SIDE_FILES` found in
    ``side_dir`` (config, tokenizer). Other ranks return an empty list.
    """
    from .hf_io import SafetensorsShardWriter, export_hf_tensors

    files: list[str] = []
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = SafetensorsShardWriter(tmp, max_shard_bytes) if _rank() == 0 else None
        for name, tensor in export_hf_tensors(model, arch):
            if writer is not None:
                writer.add(name, tensor)
        if writer is not None:
            files = writer.close()
            if side_dir is not None:
                for name in HF_SIDE_FILES:
                    src = Path(side_dir) / name
                    if src.is_file():
                        shutil.copy2(src, tmp / name)
    return files


@contextlib.contextmanager
def in_process_write_results() -> Iterator[None]:
    """Run a synchronous ``dist_checkpointing.save`` with its write results passed in this process.

    megatron's torch_dist writer hands its results to the caller through a queue built for an
    asynchronous writer process: a ``multiprocessing`` Manager started with ``spawn``, created on
    the first save (dist_checkpointing/strategies/filesystem_async.py ``get_write_results_queue``).
    A synchronous save writes and reads that queue in the calling process, yet pays for the
    Manager's interpreter, which imports torch to unpickle the first results: ~2.7 s on a 2-core
    CPU, on every rank. A plain ``queue.Queue`` carries the same objects. Once an asynchronous
    save has made the real queue, it is left in place."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        yield
        return
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = None


def save_model(model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Save this rank's model chunk into ``ckpt_dir/model`` (a collective over all ranks)."""
    from megatron.core import dist_checkpointing

    model_dir = ckpt_dir / MODEL_SUBDIR
    if _rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    with in_process_write_results():
        dist_checkpointing.save(model.sharded_state_dict(), str(model_dir))


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys are not the model's (beyond Transformer Engine's ``_extra_state``)."""


class CheckpointReadError(RuntimeError):
    """torch.distributed.checkpoint failed to read a checkpoint (a corrupt or incomplete file)."""


def is_extra_state_key(key: str) -> bool:
    """Whether a dist-checkpoint key holds a module's ``_extra_state`` (no weights in it).

    Transformer Engine modules carry one (their quantization metadata: TE 2.20 ``pytorch/ops/op.py:632``,
    ``pytorch/module/base.py:1354``); megatron's own linear layers save an empty one
    (megatron-core 0.19 ``tensor_parallel/layers.py:1229-1233``); torch norms have none.
    """
    return key.rsplit(".", 1)[-1] == "_extra_state"


def describe_checkpoint_exception(err: BaseException) -> str:
    """One line per failing rank of a torch DCP ``CheckpointException`` (its str() holds whole tracebacks)."""
    failures = getattr(err, "failures", None) or {}
    parts = [f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _trace) in sorted(failures.items())]
    return "; ".join(parts) if parts else f"{type(err).__name__}: {err}"


def _same_on_all_ranks(problems: list[str]) -> list[str]:
    """Every rank's problems, so that all ranks raise together instead of some waiting in a collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problems
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    return sorted({p for rank_problems in gathered for p in (rank_problems or [])})


def load_model(model: torch.nn.Module, ckpt_dir: str | Path, sharded_strategy: Any = None) -> None:
    """Load ``ckpt_dir/model`` into this rank's model chunk, whatever layout it was saved at.

    Keys must match both ways, except ``*._extra_state`` keys: a checkpoint written without
    Transformer Engine (CPU, ``layer_impl: local*``) has none for the norms that a TE build makes
    ``TENorm`` (the final norm under any spec when TE is importable, megatron-core 0.19
    ``transformer/transformer_block.py:53-56, 250-254``; TE's q/k norms,
    ``models/gpt/gpt_layer_specs.py:318-330``), and a TE-written one has some that a local build
    does not request. Those modules keep their initial extra state (no weights live in it).
    Anything else missing on either side raises :class:`CheckpointMismatchError` on every rank.
    ``sharded_strategy``: a dist-checkpointing load strategy (None: megatron's default).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    if not (model_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no complete megatron checkpoint (metadata.json missing)")
    # RETURN_ALL: megatron drops requested keys the checkpoint lacks from the load and returns both
    # sides' mismatches instead of letting torch DCP fail on the first one
    # (megatron-core 0.19 dist_checkpointing/validation.py:64-83, 180-184, 237-282). In megatron's
    # terms "missing" = in the checkpoint, not requested; "unexpected" = requested, not in the checkpoint.
    try:
        state, ckpt_only, model_only = dist_checkpointing.load(model.sharded_state_dict(), str(model_dir),
                                                               sharded_strategy=sharded_strategy,
                                                               strict=StrictHandling.RETURN_ALL)
    except CheckpointException as err:  # a BaseException (torch/distributed/checkpoint/api.py:30)
        raise CheckpointReadError(f"checkpoint {model_dir} could not be read: "
                                  f"{describe_checkpoint_exception(err)}") from err
    tolerated = sorted(k for k in (*ckpt_only, *model_only) if is_extra_state_key(k))
    problems = [f"not in the checkpoint: {k}" for k in sorted(model_only) if not is_extra_state_key(k)]
    problems += [f"in the checkpoint but not in the model: {k}" for k in sorted(ckpt_only) if not is_extra_state_key(k)]
    problems = _same_on_all_ranks(problems)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise CheckpointMismatchError(f"checkpoint {model_dir} does not match the model: {shown}")
    if tolerated:
        logger.info("checkpoint %s: %d module(s) without a saved _extra_state on one side (checkpoint written "
                    "with a different layer implementation, e.g. with or without Transformer Engine); they "
                    "keep their initial extra state: %s", model_dir, len(tolerated), tolerated[:4])
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_extra_state_key(k)]
    if missing or unexpected:
        raise CheckpointMismatchError(f"checkpoint {model_dir} does not match the model: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
