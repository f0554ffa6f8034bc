"""Run micro-batches through megatron-core's pipeline schedule: forward-only passes and training steps.

The same code path serves every TP / PP / DP layout: ``get_forward_backward_func()`` picks the
no-pipelining or 1F1B schedule, megatron's DDP reduces gradients (distributed optimizer or
not), and ``finalize_model_grads`` finishes them.

Loss contract (what makes results independent of layout and micro-batch count): a
``loss_fn(logits, micro_batch)`` returns this micro-batch's *share* of the final loss, i.e. a
sum over its tokens of per-token terms already divided by denominators computed once over the
global batch, plus a report dict. The final loss is the plain sum of the shares over all
micro-batches and data-parallel ranks. :func:`train_step` cancels megatron's per-token
normalisation (``calculate_per_token_loss=True``) so the gradient is exactly that of this sum.
Under context parallelism the sums (and ``num_loss_tokens``) also run over the CP ranks, each of
which holds its part of every packed sequence.

The micro-batch a ``loss_fn`` (or a :func:`run_forward` ``output_fn``) receives is this rank's
device copy, with ``micro_batch.index`` set to its position in the list passed in: a loss that
needs per-micro-batch inputs computed earlier (lp_old from a forward-only pass) takes them as a
list and looks them up by that index, instead of the caller mutating the micro-batches in between.

Micro-batches are either padded rows (:class:`~scope_megatron.batch.MicroBatch`, [b, s]) or packed
rows (:class:`~scope_megatron.batch.PackedMicroBatch`, [1, T] with ``cu_seqlens``: see
:mod:`scope_megatron.packing`); :func:`forward_micro_batch` runs either kind, and both may be mixed in
one call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist

from .batch import MicroBatch, PackedMicroBatch
from .parallel import local_device

logger = logging.getLogger(__name__)


LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
OutputFn = Callable[[torch.Tensor, MicroBatch], Any]


def _as_list(model) -> list[torch.nn.Module]:
    return model if isinstance(model, list) else [model]


def _run_schedule(model, forward_step, micro_batches: list[MicroBatch], *, forward_only: bool,
                  collect_non_loss_data: bool = False) -> list[Any]:
    """megatron's forward_backward_func over ``micro_batches`` (each may have its own [b, s]).

    The data iterator yields each micro-batch's device copy with ``index`` set to its position.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = local_device()

    def on_device():
        for index, mb in enumerate(micro_batches):
            copy = mb.to(device)
            copy.index = index
            yield copy

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=on_device(),
        model=_as_list(model),
        num_microbatches=len(micro_batches),
        seq_length=max(mb.tokens.shape[1] for mb in micro_batches),  # sizes p2p buffers only
        micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def run_forward(model, micro_batches: list[MicroBatch], output_fn: OutputFn | None = None) -> list[Any]:
    """Forward-only pass; on the last pipeline stage return ``output_fn(logits, mb)`` per micro-batch.

    ``mb`` is the micro-batch's device copy with ``mb.index`` its position in ``micro_batches``.
    Without ``output_fn`` the raw vocab-parallel logits [b, s, V_padded / TP] are returned.
    Other stages return an empty list.
    """
    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        logits = forward_micro_batch(chunk, mb)
        if output_fn is None:
            return logits, None
        return logits, lambda out, non_loss_data=True: output_fn(out, mb)

    with torch.no_grad():
        return _run_schedule(model, forward_step, micro_batches, forward_only=True,
                             collect_non_loss_data=output_fn is not None)


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float
    grad_norm: float  # before clipping
    learning_rate: float
    update_successful: bool
    num_loss_tokens: int
    report: dict[str, float]


def _global_loss_tokens(micro_batches: list[MicroBatch]) -> int:
    from megatron.core import parallel_state as ps

    total = torch.tensor([sum(mb.num_loss_tokens for mb in micro_batches)], dtype=torch.int64, device=local_device())
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return int(total.item())


def _optimizer_step(optimizer, skip_nonfinite: bool) -> tuple[bool, float]:
    """Clip and step megatron's optimizer; return ``(update_successful, grad_norm before clipping)``.

    With ``skip_nonfinite`` the global grad norm is computed once, before anything touches the
    weights, and a NaN/inf norm skips the update (weights, Adam moments and step count untouched;
    the gradients are dropped at the next step's zero_grad). The steps are megatron-core 0.19's
    ``ChainedOptimizer.step`` (optimizer/optimizer.py:1855-1938) with the check in between:
    ``prepare_grads`` -> ``get_grad_norm`` -> clip by that norm -> ``step_with_ready_grads``.
    Separate grad-norm groups (MTP) and precision-aware (decoupled) grads need megatron's own
    clipping; for those ``optimizer.step()`` runs after the check (a second grad copy and norm).
    """
    if not skip_nonfinite:
        update_successful, grad_norm, _ = optimizer.step()
        return bool(update_successful), float(grad_norm) if grad_norm is not None else 0.0
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.optimizer import SEPARATE_GRAD_NORM_GROUPS

    found_inf = optimizer.prepare_grads()  # copies model grads to main grads; True only under loss scaling
    grad_norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    config = optimizer.config
    if config.use_precision_aware_optimizer or any(optimizer.has_grad_norm_group(g) for g in SEPARATE_GRAD_NORM_GROUPS):
        update_successful, _, _ = optimizer.step()
        return bool(update_successful), grad_norm
    if config.clip_grad > 0.0:
        parameters = optimizer.get_parameters()  # the main (fp32) params across chained optimizers
        if parameters:
            clip_grad_by_total_norm_fp32(parameters, max_norm=config.clip_grad, total_norm=grad_norm)
    if grad_norm > config.grad_norm_skip_threshold:  # megatron's own skip rule (inf unless configured)
        return False, grad_norm
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(model, optimizer, scheduler, micro_batches: list[MicroBatch], loss_fn: LossFn, *,
               skip_nonfinite: bool = True) -> StepResult:
    """One forward/backward over ``micro_batches`` (this DP rank's share) and one optimizer step.

    ``model`` is the DDP-wrapped chunk (or list of chunks), ``optimizer`` and ``scheduler`` come
    from :func:`wrap_for_training`; see the module docstring for the loss contract. Returns the
    summed loss and the reports, reduced over micro-batches and DP ranks. With ``skip_nonfinite``
    a NaN/inf global grad norm skips the update and the LR schedule step
    (``update_successful=False``): a bad batch never reaches the weights or the optimizer state.
    """
    from megatron.core import parallel_state as ps

    chunks = _as_list(model)
    device = local_device()
    global_tokens = _global_loss_tokens(micro_batches)
    scale = float(max(global_tokens, 1))

    def loss_func(mb: MicroBatch, output: torch.Tensor):
        share, report = loss_fn(output, mb)
        report = {"loss": share.detach().float(), **{k: v.detach().float() for k, v in report.items()}}
        # megatron divides the gradient by the global token count; multiply it back in.
        return share * scale, torch.tensor(mb.num_loss_tokens, dtype=torch.int, device=device), report

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        return forward_micro_batch(chunk, mb), partial(loss_func, mb)

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(chunks, forward_step, micro_batches, forward_only=False)
    learning_rate = optimizer.param_groups[0]["lr"]
    update_successful, grad_norm = _optimizer_step(optimizer, skip_nonfinite)
    if update_successful:
        scheduler.step(1)

    # Sum reports over micro-batches (last stage), DP ranks, then share them with every stage.
    keys = sorted(reports[0]) if reports else []
    last = dist.get_global_rank(ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size() - 1)
    key_list = [keys]
    dist.broadcast_object_list(key_list, src=last, group=ps.get_pipeline_model_parallel_group())
    keys = key_list[0]
    values = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for rep in reports:
        values += torch.stack([rep[k].to(torch.float64).reshape(()) for k in keys])
    dist.all_reduce(values, group=ps.get_data_parallel_group(with_context_parallel=True))
    dist.broadcast(values, src=last, group=ps.get_pipeline_model_parallel_group())
    summed = dict(zip(keys, values.tolist()))
    return StepResult(loss=summed.pop("loss", 0.0), grad_norm=grad_norm,
                      learning_rate=float(learning_rate), update_successful=bool(update_successful), num_loss_tokens=global_tokens, report=summed)


def wrap_for_training(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.01, clip_grad: float = 1.0,
                      adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                      use_distributed_optimizer: bool = True, lr_warmup_steps: int = 0,
                      lr_decay_style: str = "constant", lr_decay_steps: int = 1, min_lr: float = 0.0):
    """Wrap a model chunk in megatron's DDP; build its (distributed) AdamW optimizer and LR schedule.

    Returns ``(ddp_model, optimizer, scheduler)``. Gradients reduce in fp32; bf16 models keep fp32
    main params. The scheduler (megatron's ``OptimizerParamScheduler``) also applies weight
    decay per parameter group: none on biases and 1-D parameters (norms), as megatron does.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, \
        finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer)
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_beta1,
                                 adam_beta2=adam_beta2, adam_eps=adam_eps, clip_grad=clip_grad,
                                 bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                                 use_distributed_optimizer=use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if lr_warmup_steps else lr, max_lr=lr, min_lr=min_lr, lr_warmup_steps=lr_warmup_steps,
        lr_decay_steps=max(lr_decay_steps, lr_warmup_steps + 1), lr_decay_style=lr_decay_style,
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=1, wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    return ddp_model, optimizer, scheduler


# ------------------------------------------------------------------------------------------------
# One micro-batch through one model chunk: padded rows, or a packed (THD) row
# ------------------------------------------------------------------------------------------------


def packed_attention_mode(chunk: torch.nn.Module) -> str:
    """"thd" when the chunk's core attention consumes ``PackedSeqParams`` (TE, SDPAttention), else "mask"."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from .model.sdpa_attention import SDPAttention

    for module in chunk.modules():
        if isinstance(module, SDPAttention) or type(module).__name__ == "TEDotProductAttention":
            return "thd"
        if isinstance(module, DotProductAttention):
            return "mask"
    return "thd"  # a stage without attention layers: the parameters are ignored


def _has_sdpa_attention(chunk: torch.nn.Module) -> bool:
    from .model.sdpa_attention import SDPAttention

    return any(isinstance(module, SDPAttention) for module in chunk.modules())


def forward_micro_batch(chunk: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Run one (DDP-wrapped or plain) model chunk on a micro-batch: padded rows, or a packed row."""
    from megatron.core import parallel_state as ps

    cp_group = ps.get_context_parallel_group(check_initialized=False)
    cp_size = cp_group.size() if cp_group is not None else 1
    if not isinstance(mb, PackedMicroBatch):
        if cp_size > 1:
            raise NotImplementedError("context parallelism needs packed micro-batches split per CP rank "
                                      "(scope_megatron.packing.build_packed_micro_batches(cp_size=...))")
        return chunk(mb.tokens, mb.position_ids, None)
    if mb.cp_size != cp_size:
        raise ValueError(f"micro-batch split for cp_size={mb.cp_size}, the context-parallel group has {cp_size} ranks")
    mode = mb.attention if mb.attention != "auto" else packed_attention_mode(chunk)
    if mode == "thd":
        # Only SDPAttention reads the CP group from the params; TE's attention got it at construction
        # (megatron-core 0.19 extensions/transformer_engine.py:1858-1868) and would re-register it in
        # every layer when the params carry one (:1986-1995).
        group = cp_group if cp_size > 1 and _has_sdpa_attention(chunk) else None
        return chunk(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params(group))
    return chunk(mb.tokens, mb.position_ids, mb.block_causal_mask())
