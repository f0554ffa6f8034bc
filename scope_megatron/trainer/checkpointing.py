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
removed by the next save. Only then are checkpoints beyond the last ``keep_last`` deleted.

Plain ``torch.optim.Adam`` (megatron without Transformer Engine / Apex, e.g. on CPU) needs three
fixes of megatron-core 0.19's distributed-optimizer checkpoint code
(``docs/megatron-notes.md`` §3); :func:`_patch_torch_adam_checkpointing` applies
them to this optimizer instance only, and only when megatron uses torch's Adam.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import types
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
    """``None`` -> None; ``latest`` -> newest complete checkpoint (None if there is none); else the path."""
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest(root)
        if latest is None:
            logger.info("resume=latest: no checkpoint under %s; starting from scratch", root)
        return latest
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


def save_optimizer(model: torch.nn.Module, optimizer: Any, ckpt_dir: Path) -> None:
    """The optimizer's sharded state (fully reshardable) into ``ckpt_dir/optimizer`` (collective)."""
    from megatron.core import dist_checkpointing

    out = ckpt_dir / OPTIMIZER_SUBDIR
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    _fill_empty_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False, metadata=SHARDING)
    dist_checkpointing.save(sharded, str(out))


def load_optimizer(model: torch.nn.Module, optimizer: Any, ckpt_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    src = ckpt_dir / OPTIMIZER_SUBDIR
    if not (src / "metadata.json").is_file():
        raise CheckpointError(f"{src} holds no complete optimizer checkpoint")
    _patch_torch_adam_checkpointing(optimizer)
    _fill_empty_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=SHARDING)
    state = dist_checkpointing.load(sharded, str(src))
    optimizer.load_state_dict(state)
    _unshare_adam_steps(optimizer)


def save_checkpoint(root: str | Path, step: int, *, model: torch.nn.Module, optimizer: Any, scheduler: Any, arch: Any,
                    hf_side_dir: str | Path | None, dtype: torch.dtype, trainer_state: dict[str, Any],
                    config_yaml: str, keep_last: int = 0) -> Path:
    """Write checkpoint ``step`` atomically on every rank (a collective); prune to ``keep_last``."""
    root = Path(root)
    final = step_dir(root, step)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    with model_ckpt.atomic_output_dir(final, overwrite=True) as tmp:
        model_ckpt.write_meta(tmp, arch, hf_side_dir, dtype, extra={"training_step": step})
        model_ckpt.save_model(model, tmp)
        save_optimizer(model, optimizer, tmp)
        if _rank() == 0:
            (tmp / RNG_SUBDIR).mkdir(exist_ok=True)
        _barrier()
        torch.save(rng_state(), tmp / RNG_SUBDIR / f"rank_{_rank():05d}.pt")
        if _rank() == 0:
            state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(),
                     "world_size": dist.get_world_size() if dist.is_initialized() else 1}
            torch.save(state, tmp / TRAINER_STATE)
            (tmp / "config.yaml").write_text(config_yaml)
    if _rank() == 0 and keep_last > 0:
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; return the trainer state dict."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {TRAINER_STATE})")
    model_ckpt.load_model(model, path)
    load_optimizer(model, optimizer, path)
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

