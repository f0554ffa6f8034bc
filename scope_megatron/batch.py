"""Micro-batch types: what the batch builders produce and the megatron schedule consumes.

- :class:`MicroBatch`: padded rows, ``tokens`` [b, s] and :class:`TokenFields` [b, s, ...];
- :class:`PackedMicroBatch`: sequences packed into one row, ``tokens`` [1, T] with ``cu_seqlens``
  (THD), optionally one context-parallel rank's share of it (:func:`context_parallel_index`);
- :class:`TokenFields`: what a micro-batch carries besides its tokens, the one definition of the
  per-token inputs of the loss and of which trajectory each row / token belongs to.

:mod:`scope_megatron.packing` and :mod:`scope_megatron.trainer.batching` build them;
:mod:`scope_megatron.megatron_step` runs them (``forward_micro_batch`` picks the attention path).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class TokenFields:
    """The per-token tensors of one micro-batch, in its layout: [b, s] padded, [1, T] packed.

    Every per-token field has the tokens' shape (``teacher_topk_*`` add a trailing K) and is zero
    (False) on padding and on filler micro-batches; None when the run does not use it. Position i
    holds the values for predicting ``targets[i]`` from ``tokens[:i + 1]`` of its sequence.
    """

    targets: torch.Tensor | None = None                # [b, s] / [1, T] int64: the next token at each position
    response_mask: torch.Tensor | None = None          # bool: True where targets is a response token (loss tokens)
    teacher_logprobs: torch.Tensor | None = None       # float32: the teacher's log p(targets)
    rollout_logprobs: torch.Tensor | None = None       # float32: the rollout engine's log p(targets) (metrics)
    teacher_topk_ids: torch.Tensor | None = None       # [..., K] int64: the teacher's top-k token ids
    teacher_topk_logprobs: torch.Tensor | None = None  # [..., K] float32: and their log-probs
    # [b] padded (one per row) / [n] packed (one per sequence) int64: indices into the step's
    # global trajectory list (what BatchPlan.select takes)
    trajectory_index: torch.Tensor | None = None
    # packed only, [1, T] int64: each token's sequence within the row (0..n-1; padding belongs to
    # the slot it pads), so trajectory_index[token_trajectory] is each token's global trajectory
    token_trajectory: torch.Tensor | None = None

    # the fields with one entry per token (sliced like the tokens by a context-parallel split)
    PER_TOKEN = ("targets", "response_mask", "teacher_logprobs", "rollout_logprobs", "teacher_topk_ids",
                 "teacher_topk_logprobs", "token_trajectory")

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the fields that are set."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def map(self, fn, per_token_only: bool = False) -> "TokenFields":
        """A copy with ``fn`` applied to every set field (only the per-token ones with ``per_token_only``)."""
        return TokenFields(**{name: fn(value) if not per_token_only or name in self.PER_TOKEN else value
                              for name, value in self.items()})

    def to(self, device: torch.device | str) -> "TokenFields":
        return self.map(lambda value: value.to(device))

    def trajectory_of_tokens(self) -> torch.Tensor:
        """Each token's global trajectory index, the tokens' shape ([b, s] padded, [1, T] packed)."""
        if self.trajectory_index is None:
            raise ValueError("these fields carry no trajectory_index")
        if self.token_trajectory is not None:
            return self.trajectory_index[self.token_trajectory]
        return self.trajectory_index[:, None].expand(self.targets.shape[:2])


@dataclass
class MicroBatch:
    """One micro-batch: token ids [b, s], and what the loss needs (:class:`TokenFields`, same leading dims)."""

    tokens: torch.Tensor  # [b, s] int64
    fields: TokenFields = field(default_factory=TokenFields)
    num_loss_tokens: int = 0  # tokens that carry a loss term (for megatron's token counter)
    # Position in the list handed to run_forward / train_step: they set it on the copy a loss or
    # output function receives, so per-micro-batch inputs computed earlier can be looked up by it.
    index: int = 0

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(self.tokens.to(device), self.fields.to(device), self.num_loss_tokens, self.index)


PACKED_ATTENTION_MODES = ("auto", "thd", "mask")


@dataclass
class PackedMicroBatch(MicroBatch):
    """Sequences packed into one row: ``tokens`` [1, T]; per-token fields [1, T]; ``trajectory_index`` [n].

    Sequence i occupies the slot ``cu_seqlens_padded[i] : cu_seqlens_padded[i + 1]`` of the row;
    its real tokens are the first ``cu_seqlens[i + 1] - cu_seqlens[i]`` of the slot, the rest of the
    slot is padding (no loss). Without padding both tensors are equal. (These are the meanings of
    megatron's / Transformer Engine's ``cu_seqlens_q`` and ``cu_seqlens_q_padded``.)

    ``attention`` picks how attention is kept inside each sequence (see
    :func:`scope_megatron.megatron_step.forward_micro_batch`):
    ``"thd"`` passes megatron a ``PackedSeqParams`` (Transformer Engine, or
    :class:`~scope_megatron.model.sdpa_attention.SDPAttention`),
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
        return PackedMicroBatch(self.tokens.to(device), self.fields.to(device), self.num_loss_tokens, self.index, self.cu_seqlens, self.cu_seqlens_padded,
                                self.attention, self.cp_size, self.cp_rank)


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
