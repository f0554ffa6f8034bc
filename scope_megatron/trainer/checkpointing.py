"""Training checkpoints: model, optimizer, scheduler, step, data position, RNG, config; atomic.

Layout (one directory per step, under ``checkpoint.dir``, default ``RUN_DIR/checkpoints``)::

    step_00000012/
      scope_megatron.json, hf/     the converted-checkpoint metadata: the directory is also a model
      model/                       checkpoint (``checkpoints_tools.megatron_to_hf --ckpt`` exports it,
                                   ``model.student`` can start a new run from it)
      optimizer/                   megatron dist-checkpoint of the optimizer, ``fully_reshardable``
                                   (loads under another TP / PP / DP layout)
      trainer_state.pt             step, scheduler, prompt-sampler position, counters
      rng/rank_00000.pt ...        every rank's RNG states (python, numpy, torch, cuda, megatron)
      config.yaml                  the run's resolved config

Atomicity: everything is written to ``step_N.partial`` and renamed to ``step_N`` only when all
ranks finished (:func:`scope_megatron.model.checkpoint.atomic_output_dir`). A crash meanwhile
leaves the previous checkpoints untouched; ``.partial`` directories are never loaded and are
removed by the next save. Only then are checkpoints beyond the last ``keep_last`` deleted, except
the best one by ``checkpoint.keep_best`` (its metric value is in ``scope_megatron.json`` as
``tracked_metric``; the text file ``best`` next to the step directories names it).

I/O (:class:`CheckpointManager`): megatron's fully-parallel strategy wrappers spread the writes and
reads of replicated shards over the data-parallel ranks; with ``async_save`` a forked process writes
the model and optimizer shards while training continues, and the rename to ``step_N`` waits for
:meth:`CheckpointManager.finalize` (called by the next save and at exit).

Plain ``torch.optim.Adam`` (megatron without Transformer Engine / Apex, e.g. on CPU) needs three
fixes of megatron-core 0.19's distributed-optimizer checkpoint code
(``docs/megatron-notes.md`` §3); :func:`_patch_torch_adam_checkpointing` applies
them to this optimizer instance only, and only when megatron uses torch's Adam.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..model import checkpoint as model_ckpt

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_SUBDIR = "optimizer"
RNG_SUBDIR = "rng"
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
BEST_POINTER = "best"                  # a text file under the root naming the best checkpoint directory


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the run."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first (``.partial`` ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """``None`` -> None; ``latest`` -> newest complete checkpoint, ``best`` -> the one the ``best``
    pointer names (None if there is none); else the path."""
    if not resume:
        return None
    if resume in ("latest", "best"):
        found = find_latest(root) if resume == "latest" else find_best(root)
        if found is None:
            logger.info("resume=%s: no such checkpoint under %s; starting from scratch", resume, root)
        return found
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"checkpoint.resume={resume!r}: {path} is not a complete training checkpoint "
                              f"(no {TRAINER_STATE})")
    return path


# ------------------------------------------------------------------------------ torch Adam fixes
def _uses_torch_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)


def _dist_optimizers(optimizer: Any) -> list[Any]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _patch_torch_adam_checkpointing(optimizer: Any) -> None:
    """Fix 2 of 3 (per instance): copy loaded states under no_grad, only keys the checkpoint holds."""
    if not _uses_torch_adam():
        return
    for opt in _dist_optimizers(optimizer):
        if getattr(opt, "_scope_patched", False):
            continue

        def _set_states(self, model_param, tensors):
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            optim_state = self.optimizer.state[main_param]
            with torch.no_grad():
                for key, src in tensors.items():
                    if not isinstance(src, torch.Tensor) or key == "step":
                        continue
                    dst = main_param if key == "param" else optim_state.get(key)
                    if isinstance(dst, torch.Tensor):
                        dst.copy_(src.view_as(dst) if src.numel() == dst.numel() else src)

        opt._set_main_param_and_optimizer_states = types.MethodType(_set_states, opt)
        opt._scope_patched = True


def _fill_empty_adam_state(optimizer: Any) -> None:
    """Fix 1: torch Adam has no state before its first step; megatron's state_dict needs one."""
    if not _uses_torch_adam():
        return
    for opt in _dist_optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _unshare_adam_steps(optimizer: Any) -> None:
    """Fix 3: megatron assigns ONE step tensor to every param; torch Adam increments it per param."""
    if not _uses_torch_adam():
        return
    for opt in _dist_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()


# ------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
        except Exception:  # tracker not initialised
            pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        if "megatron_tracker" in state:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            get_cuda_rng_tracker().set_states(state["megatron_tracker"])


# ------------------------------------------------------------------------------ save / load
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------ I/O strategies
def _data_parallel_group() -> Any:
    """The group that holds replicas of the same shards: megatron's DP x CP group (WORLD without
    megatron's groups). Megatron-LM parallelises save and load over exactly this group
    (megatron/training/checkpointing.py: ``get_data_parallel_group(with_context_parallel=True)``)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_data_parallel_group(with_context_parallel=True)
    return dist.group.WORLD


def save_strategy(fully_parallel: bool) -> Any:
    """The dist-checkpointing save strategy: torch_dist, wrapped to spread the writes of replicated
    shards over the data-parallel ranks when ``fully_parallel`` (None: megatron's default)."""
    if not fully_parallel or not dist.is_initialized():
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), _data_parallel_group())


def load_strategy(fully_parallel: bool, ckpt_dir: str | Path) -> Any:
    """The load strategy: each data-parallel rank reads 1/DP of the shards it needs and the ranks
    exchange the rest, instead of every rank reading everything (None: megatron's default)."""
    if not fully_parallel or not dist.is_initialized():
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(ckpt_dir)), _data_parallel_group())


def _save_sharded(sharded_state_dict: dict[str, Any], out: Path, fully_parallel: bool, async_save: bool) -> Any:
    """``dist_checkpointing.save`` into ``out`` (a collective); the AsyncRequest when ``async_save``.

    Async uses megatron's own ("mcore") writer: the NVRx one needs nvidia-resiliency-ext
    (dist_checkpointing/strategies/torch.py ``get_async_strategy``). metadata.json is written by
    the request's finalize step, so an unfinished async save is never a loadable directory
    (dist_checkpointing/serialization.py ``save``: ``metadata_finalize_fn``)."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    writes = contextlib.nullcontext() if async_save else model_ckpt.in_process_write_results()
    with writes:
        return dist_checkpointing.save(sharded_state_dict, str(out), sharded_strategy=save_strategy(fully_parallel),
                                       async_sharded_save=async_save, async_strategy="mcore")


def save_optimizer(model: torch.nn.Module, optimizer: Any, ckpt_dir: Path, *, fully_parallel: bool = False,
                   async_save: bool = False) -> Any:
    """The optimizer's sharded state (fully reshardable) into ``ckpt_dir/optimizer`` (collective);
    returns the AsyncRequest when ``async_save`` (None otherwise)."""
    _fill_empty_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False, metadata=SHARDING)
    return _save_sharded(sharded, ckpt_dir / OPTIMIZER_SUBDIR, fully_parallel, async_save)


def load_optimizer(model: torch.nn.Module, optimizer: Any, ckpt_dir: Path, *, fully_parallel: bool = False) -> None:
    from megatron.core import dist_checkpointing

    src = ckpt_dir / OPTIMIZER_SUBDIR
    if not (src / "metadata.json").is_file():
        raise CheckpointError(f"{src} holds no complete optimizer checkpoint")
    _patch_torch_adam_checkpointing(optimizer)
    _fill_empty_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=SHARDING)
    state = dist_checkpointing.load(sharded, str(src), sharded_strategy=load_strategy(fully_parallel, src))
    optimizer.load_state_dict(state)
    _unshare_adam_steps(optimizer)


# ------------------------------------------------------------------------------ keep-best bookkeeping
def tracked_metric(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The ``{"name", "value", "mode"}`` a checkpoint was saved with for keep-best (None: none)."""
    meta_path = Path(ckpt_dir) / model_ckpt.META_FILE
    if not meta_path.is_file():
        return None
    try:
        value = json.loads(meta_path.read_text()).get("tracked_metric")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def select_best(candidates: list[tuple[int, float]], mode: str) -> int | None:
    """The step of the best (step, value) pair: highest (``max``) or lowest (``min``) finite value;
    on a tie the earliest step (a later checkpoint must improve strictly to replace the best)."""
    best_step, best_value = None, None
    for step, value in sorted(candidates):
        if not math.isfinite(value):
            continue
        if best_value is None or (value > best_value if mode == "max" else value < best_value):
            best_step, best_value = step, value
    return best_step


def find_best(root: str | Path) -> Path | None:
    """The checkpoint the ``best`` pointer names, if it is complete (None otherwise)."""
    pointer = Path(root) / BEST_POINTER
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if STEP_RE.match(path.name) and (path / TRAINER_STATE).is_file() else None


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / (BEST_POINTER + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / BEST_POINTER)


# ------------------------------------------------------------------------------ the manager
@dataclass
class _PendingSave:
    """A checkpoint whose shards an async writer is still writing into ``tmp``."""

    step: int
    tmp: Path
    final: Path


class CheckpointManager:
    """Saves training checkpoints under ``root`` and owns what survives: the last ``keep_last``
    (0: all) plus, with ``keep_best`` (a metric name, "" = off), the checkpoint whose metric is
    best by ``keep_best_mode`` (``max`` | ``min``); ``root/best`` names it.

    A checkpoint is a candidate only if the ``metrics`` given to :meth:`save` hold a finite value
    under ``keep_best`` (a step without evaluation is not). The value lives in the checkpoint's
    ``scope_megatron.json`` (``tracked_metric``), so the best is recomputed from disk after a
    restart. With ``async_save`` the model and optimizer shards are written by a forked process
    while training goes on; the directory is renamed into place (and older ones pruned) only when
    :meth:`finalize` has seen every rank's writes finish. Contract: :meth:`save` finalizes the
    previous save first; call :meth:`finalize` (or :meth:`close`) before exit. All methods except
    the constructor are collectives: call them on every rank.
    """

    def __init__(self, root: str | Path, *, keep_last: int = 0, keep_best: str = "", keep_best_mode: str = "max",
                 fully_parallel: bool = True, async_save: bool = False):
        if keep_best_mode not in ("max", "min"):
            raise ValueError(f"keep_best_mode must be max or min, got {keep_best_mode!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.keep_best_mode = keep_best_mode
        self.fully_parallel = fully_parallel
        self.async_save = async_save
        self._queue: Any = None
        self._pending: _PendingSave | None = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)

    @classmethod
    def from_config(cls, cfg: Any) -> CheckpointManager:
        """A manager for ``cfg.checkpoint`` (a :class:`scope_megatron.config.Config`)."""
        k = cfg.checkpoint
        return cls(cfg.checkpoint_dir, keep_last=k.keep_last, keep_best=k.keep_best, keep_best_mode=k.keep_best_mode,
                   fully_parallel=k.fully_parallel, async_save=k.async_save)

    @property
    def pending_step(self) -> int | None:
        """The step of an async save not finalized yet (None: nothing in flight)."""
        return self._pending.step if self._pending is not None else None

    def _tracked_value(self, step: int, metrics: dict[str, Any] | None, final: Path) -> float | None:
        if not self.keep_best:
            return None
        value = (metrics or {}).get(self.keep_best)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        # re-saving a step (the save at the end of a run) keeps the value it was first saved with
        previous = tracked_metric(final) if final.is_dir() else None
        if previous and previous.get("name") == self.keep_best and isinstance(previous.get("value"), (int, float)):
            return float(previous["value"])
        return None

    def save(self, step: int, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, arch: Any,
             hf_side_dir: str | Path | None, dtype: torch.dtype, trainer_state: dict[str, Any], config_yaml: str,
             metrics: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``step`` (returns its final path). Sync: complete and pruned on return.
        Async: the shards are still being written; :meth:`finalize` publishes it."""
        self.finalize()
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()
        final = step_dir(self.root, step).resolve()
        tmp = final.with_name(final.name + ".partial")
        value = self._tracked_value(step, metrics, final)
        if _rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crashed save of this step
            tmp.mkdir(parents=True)
        _barrier()
        requests = []
        try:
            extra: dict[str, Any] = {"training_step": step}
            if value is not None:
                extra["tracked_metric"] = {"name": self.keep_best, "value": value, "mode": self.keep_best_mode}
            model_ckpt.write_meta(tmp, arch, hf_side_dir, dtype, extra=extra)
            requests.append(_save_sharded(model.sharded_state_dict(), tmp / model_ckpt.MODEL_SUBDIR,
                                          self.fully_parallel, self.async_save))
            requests.append(save_optimizer(model, optimizer, tmp, fully_parallel=self.fully_parallel,
                                           async_save=self.async_save))
            if _rank() == 0:
                (tmp / RNG_SUBDIR).mkdir(exist_ok=True)
            _barrier()
            torch.save(rng_state(), tmp / RNG_SUBDIR / f"rank_{_rank():05d}.pt")
            if _rank() == 0:
                state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(),
                         "world_size": dist.get_world_size() if dist.is_initialized() else 1}
                torch.save(state, tmp / TRAINER_STATE)
                (tmp / "config.yaml").write_text(config_yaml)
            if self.async_save:
                for request in requests:
                    self._queue.schedule_async_request(request)
        except BaseException:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        pending = _PendingSave(step, tmp, final)
        if self.async_save:
            self._pending = pending
            logger.info("checkpoint of step %d: async write started", step)
        else:
            self._publish(pending)
        return final

    def poll(self) -> bool:
        """Publish an async save whose writes all finished, without waiting; True if none is left."""
        if self._pending is None:
            return True
        self._queue.maybe_finalize_async_calls(blocking=False)
        if self._queue.get_num_unfinalized_calls() == 0:
            self._publish(self._pending)
        return self._pending is None

    def finalize(self) -> Path | None:
        """Wait for an async save in flight and publish it; its path (None: nothing was pending)."""
        if self._pending is None:
            return None
        pending = self._pending
        try:
            self._queue.maybe_finalize_async_calls(blocking=True)
        except BaseException:
            self._pending = None
            if _rank() == 0:
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise
        self._publish(pending)
        return pending.final

    def close(self) -> None:
        """Finalize what is in flight and stop the async writer (idempotent)."""
        self.finalize()
        if self._queue is not None:
            self._queue.close()
            self._queue = None
            self.async_save = False

    def _publish(self, pending: _PendingSave) -> None:
        """Rename ``step_N.partial`` to ``step_N`` (replacing an older one) on rank 0, then prune."""
        _barrier()
        if _rank() == 0:
            model_ckpt.replace_dir(pending.tmp, pending.final)
            for leftover in self.root.glob("step_*.partial"):  # what a killed run left behind
                shutil.rmtree(leftover, ignore_errors=True)
            self._prune()
        self._pending = None
        _barrier()

    def best_step(self) -> int | None:
        """The step of the best complete checkpoint under ``root`` for ``keep_best`` (None: off / none)."""
        if not self.keep_best:
            return None
        candidates = []
        for step, path in list_checkpoints(self.root):
            tracked = tracked_metric(path)
            if tracked and tracked.get("name") == self.keep_best and isinstance(tracked.get("value"), (int, float)):
                candidates.append((step, float(tracked["value"])))
        return select_best(candidates, self.keep_best_mode)

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.root)
        best = self.best_step()
        if best is not None:
            _write_pointer(self.root, step_dir(self.root, best).name)
        if self.keep_last <= 0:
            return
        keep = {step for step, _ in ckpts[-self.keep_last:]} | ({best} if best is not None else set())
        for step, path in ckpts:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, arch: Any,
                    hf_side_dir: str | Path | None, dtype: torch.dtype, trainer_state: dict[str, Any],
                    config_yaml: str, keep_last: int = 0, keep_best: str = "", keep_best_mode: str = "max",
                    metrics: dict[str, Any] | None = None, fully_parallel: bool = True) -> Path:
    """Write checkpoint ``step`` synchronously on every rank (a collective); prune to ``keep_last``
    plus the ``keep_best`` checkpoint (see :class:`CheckpointManager`, which also saves asynchronously)."""
    manager = CheckpointManager(root, keep_last=keep_last, keep_best=keep_best, keep_best_mode=keep_best_mode,
                                fully_parallel=fully_parallel)
    return manager.save(step, model=model, optimizer=optimizer, scheduler=scheduler, arch=arch, hf_side_dir=hf_side_dir,
                        dtype=dtype, trainer_state=trainer_state, config_yaml=config_yaml, metrics=metrics)


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    fully_parallel: bool = True) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; return the trainer state dict.
    ``fully_parallel``: the data-parallel ranks share the reads (:func:`load_strategy`)."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {TRAINER_STATE})")
    model_ckpt.load_model(model, path, sharded_strategy=load_strategy(fully_parallel, path / model_ckpt.MODEL_SUBDIR))
    load_optimizer(model, optimizer, path, fully_parallel=fully_parallel)
    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / RNG_SUBDIR / f"rank_{_rank():05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rng_file.is_file() and state.get("world_size") == world:
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    else:
        logger.warning("checkpoint %s: RNG states not restored (saved with world size %s, now %d)", path,
                       state.get("world_size"), world)
    return state


def export_hf(model: torch.nn.Module, arch: Any, out_dir: str | Path, hf_side_dir: str | Path | None) -> Path:
    """Write the current weights as an HF directory (safetensors + config/tokenizer), atomically."""
    model_ckpt.export_hf_dir(model, arch, out_dir, hf_side_dir, overwrite=True)
    return Path(out_dir)


def checkpoint_is_loadable(path: str | Path) -> bool:
    """Cheap structural check: every part of a complete checkpoint is present."""
    path = Path(path)
    return all((path / p).exists() for p in (TRAINER_STATE, "model/metadata.json", "optimizer/metadata.json",
                                             model_ckpt.META_FILE))

