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

Micro-batches are either padded rows (:class:`MicroBatch`, [b, s]) or packed rows
(:class:`PackedMicroBatch`, [1, T] with ``cu_seqlens``: see :mod:`scope_megatron.packing`);
:func:`forward_micro_batch` runs either kind, and both may be mixed in one call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """One micro-batch: token ids [b, s], and whatever the loss needs (same leading dims)."""

    tokens: torch.Tensor  # [b, s] int64
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    num_loss_tokens: int = 0  # tokens that carry a loss term (for megatron's token counter)

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(self.tokens.to(device), {k: v.to(device) for k, v in self.extras.items()},
                          self.num_loss_tokens)


LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
OutputFn = Callable[[torch.Tensor, MicroBatch], Any]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _as_list(model) -> list[torch.nn.Module]:
    return model if isinstance(model, list) else [model]


def _run_schedule(model, forward_step, micro_batches: list[MicroBatch], *, forward_only: bool,
                  collect_non_loss_data: bool = False) -> list[Any]:
    """megatron's forward_backward_func over ``micro_batches`` (each may have its own [b, s])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=_as_list(model),
        num_microbatches=len(micro_batches),
        seq_length=max(mb.tokens.shape[1] for mb in micro_batches),  # sizes p2p buffers only
        micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def run_forward(model, micro_batches: list[MicroBatch], output_fn: OutputFn | None = None) -> list[Any]:
    """Forward-only pass; on the last pipeline stage return ``output_fn(logits, mb)`` per micro-batch.

    Without ``output_fn`` the raw vocab-parallel logits [b, s, V_padded / TP] are returned.
    Other stages return an empty list.
    """
    device = _device()

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator).to(device)
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

    total = torch.tensor([sum(mb.num_loss_tokens for mb in micro_batches)], dtype=torch.int64, device=_device())
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return int(total.item())


def train_step(model, optimizer, scheduler, micro_batches: list[MicroBatch], loss_fn: LossFn) -> StepResult:
    """One forward/backward over ``micro_batches`` (this DP rank's share) and one optimizer step.

    ``model`` is the DDP-wrapped chunk (or list of chunks), ``optimizer`` and ``scheduler`` come
    from :func:`wrap_for_training`; see the module docstring for the loss contract. Returns the
    summed loss and the reports, reduced over micro-batches and DP ranks.
    """
    from megatron.core import parallel_state as ps

    chunks = _as_list(model)
    device = _device()
    global_tokens = _global_loss_tokens(micro_batches)
    scale = float(max(global_tokens, 1))

    def loss_func(mb: MicroBatch, output: torch.Tensor):
        share, report = loss_fn(output, mb)
        report = {"loss": share.detach().float(), **{k: v.detach().float() for k, v in report.items()}}
        # megatron divides the gradient by the global token count; multiply it back in.
        return share * scale, torch.tensor(mb.num_loss_tokens, dtype=torch.int, device=device), report

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator).to(device)
        return forward_micro_batch(chunk, mb), partial(loss_func, mb)

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(chunks, forward_step, micro_batches, forward_only=False)
    learning_rate = optimizer.param_groups[0]["lr"]
    update_successful, grad_norm, _ = optimizer.step()
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
    return StepResult(loss=summed.pop("loss", 0.0), grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
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
# Packed (THD) micro-batches: several sequences concatenated in one row, attention kept per sequence
# ------------------------------------------------------------------------------------------------

PACKED_ATTENTION_MODES = ("auto", "thd", "mask")


@dataclass
class PackedMicroBatch(MicroBatch):
    """Sequences packed into one row: ``tokens`` [1, T]; per-token extras [1, T]; per-sequence extras [n].

    Sequence i occupies the slot ``cu_seqlens_padded[i] : cu_seqlens_padded[i + 1]`` of the row;
    its real tokens are the first ``cu_seqlens[i + 1] - cu_seqlens[i]`` of the slot, the rest of the
    slot is padding (no loss). Without padding both tensors are equal. (These are the meanings of
    megatron's / Transformer Engine's ``cu_seqlens_q`` and ``cu_seqlens_q_padded``.)

    ``attention`` picks how attention is kept inside each sequence (see :func:`forward_micro_batch`):
    ``"thd"`` passes megatron a ``PackedSeqParams`` (Transformer Engine, or :class:`SDPAttention`),
    ``"mask"`` passes a block-diagonal causal mask [1, 1, T, T] (any core attention that honours an
    explicit mask: megatron's unfused ``DotProductAttention`` or SDPA; O(T^2) memory), ``"auto"``
    chooses from the model's core-attention class.

    Context parallelism (``cp_size > 1``, from :func:`scope_megatron.packing.shard_for_context_parallel`):
    this rank holds chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of every slot cut in
    ``2 * cp_size`` equal chunks (megatron's load-balanced layout), so ``tokens`` is [1, T / cp_size]
    while ``cu_seqlens`` / ``cu_seqlens_padded`` still describe the whole row, as megatron expects.
    """

    cu_seqlens: torch.Tensor | None = None         # [n + 1] int32, cumulative real lengths
    cu_seqlens_padded: torch.Tensor | None = None  # [n + 1] int32, cumulative slot lengths (None: no padding)
    attention: str = "auto"
    cp_size: int = 1
    cp_rank: int = 0

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape[0] != 1:
            raise ValueError(f"packed tokens must be [1, T], got {tuple(self.tokens.shape)}")
        if self.cu_seqlens is None:
            raise ValueError("a PackedMicroBatch needs cu_seqlens")
        if self.attention not in PACKED_ATTENTION_MODES:
            raise ValueError(f"attention must be one of {PACKED_ATTENTION_MODES}, got {self.attention!r}")
        slots = self.slot_bounds
        total = self.tokens.shape[1] * self.cp_size
        if int(slots[0]) != 0 or int(slots[-1]) != total or bool((slots[1:] <= slots[:-1]).any()):
            raise ValueError(f"slot boundaries {slots.tolist()} must rise strictly from 0 to T = {total}")
        if self.cp_size > 1 and bool(((slots[1:] - slots[:-1]) % (2 * self.cp_size)).any()):
            raise ValueError(f"with context parallelism every slot must be a multiple of 2 * cp = {2 * self.cp_size}")
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"cp_rank {self.cp_rank} outside cp_size {self.cp_size}")
        if bool((self.seq_lengths > slots[1:] - slots[:-1]).any()) or bool((self.seq_lengths < 1).any()):
            raise ValueError("every sequence needs 1 <= length <= its slot")

    @property
    def slot_bounds(self) -> torch.Tensor:
        return self.cu_seqlens if self.cu_seqlens_padded is None else self.cu_seqlens_padded

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def seq_lengths(self) -> torch.Tensor:
        """[n] real lengths."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @property
    def slot_lengths(self) -> torch.Tensor:
        bounds = self.slot_bounds
        return (bounds[1:] - bounds[:-1]).long()

    @property
    def max_seqlen(self) -> int:
        return int(self.slot_lengths.max())

    def local_index(self) -> torch.Tensor:
        """[T / cp_size] positions in the whole packed row of this rank's tokens (arange without CP)."""
        return context_parallel_index(self.slot_bounds, self.cp_size, self.cp_rank).to(self.tokens.device)

    @property
    def position_ids(self) -> torch.Tensor:
        """[1, T] positions restarting at 0 in every slot (RoPE itself uses cu_seqlens / the mask)."""
        lengths = self.slot_lengths.to(self.tokens.device)
        starts = self.slot_bounds[:-1].to(self.tokens.device).long()
        index = self.local_index()
        return (index - torch.repeat_interleave(starts, lengths)[index]).unsqueeze(0)

    @property
    def pad_between_seqs(self) -> bool:
        """Whether any slot holds padding after its sequence, the last slot included."""
        return self.cu_seqlens_padded is not None and bool((self.cu_seqlens != self.cu_seqlens_padded).any())

    def packed_seq_params(self, cp_group=None):
        """megatron's ``PackedSeqParams`` (THD) for this row.

        ``pad_between_seqs`` is set explicitly (computed on the CPU tensors, no device sync): TE
        releases that infer it compare ``cu_seqlens_q_padded[:-1]`` with ``cu_seqlens_q[:-1]`` and so
        miss padding in the last slot only (TE v2.12 ``dot_product_attention.py:1328-1338``), which
        is every one-sequence row under context parallelism; megatron forwards the field to TE
        >= 2.2 (megatron-core 0.19 ``extensions/transformer_engine.py:1944-1945``). Without padding
        the padded bounds are the same tensor object as the real ones: TE 2.20 infers "no padding"
        from that identity (``pytorch/attention/dot_product_attention/dot_product_attention.py:2709-2728``)
        and keeps its padding-free kernels eligible.
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        device = self.tokens.device
        pad = self.pad_between_seqs
        cu = self.cu_seqlens.to(device=device, dtype=torch.int32)
        cu_padded = self.slot_bounds.to(device=device, dtype=torch.int32) if pad else cu
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                               cu_seqlens_kv_padded=cu_padded, max_seqlen_q=self.max_seqlen,
                               max_seqlen_kv=self.max_seqlen, cp_group=cp_group, pad_between_seqs=pad)

    def block_causal_mask(self) -> torch.Tensor:
        """[1, 1, T, T] bool, True = masked (megatron's convention): causal inside each slot only."""
        if self.cp_size > 1:
            raise NotImplementedError("the block-diagonal mask path does not support context parallelism")
        slot = torch.repeat_interleave(torch.arange(self.num_sequences, device=self.tokens.device),
                                       self.slot_lengths.to(self.tokens.device))
        index = torch.arange(slot.numel(), device=self.tokens.device)
        allowed = (slot[:, None] == slot[None, :]) & (index[None, :] <= index[:, None])
        return (~allowed)[None, None]

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        return PackedMicroBatch(self.tokens.to(device), {k: v.to(device) for k, v in self.extras.items()},
                                self.num_loss_tokens, self.cu_seqlens, self.cu_seqlens_padded, self.attention,
                                self.cp_size, self.cp_rank)


def context_parallel_index(slot_bounds: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Row positions held by CP rank ``cp_rank``: chunks r and 2cp-1-r of each slot cut in 2cp chunks.

    ``slot_bounds`` [n + 1] are the (padded) cumulative slot lengths of the whole row, each slot a
    multiple of ``2 * cp_size``. Returns int64 [T / cp_size] in this rank's token order.
    """
    bounds = [int(b) for b in slot_bounds.tolist()]
    if cp_size == 1:
        return torch.arange(bounds[-1])
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * cp_size)
        for j in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + j * chunk, start + (j + 1) * chunk))
    return torch.cat(pieces)


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
