"""Packed (THD) micro-batches formed by a token budget, balanced over data-parallel ranks.

Three steps, all deterministic (every rank computes the same plan from the same lengths):

1. :func:`partition_balanced` splits the global batch's sequences over the DP ranks so that the
   ranks' token totals are as even as possible (Karmarkar-Karp largest differencing, or greedy
   longest-first).
2. :func:`plan_packed` cuts each rank's share into micro-batches of at most
   ``max_tokens_per_microbatch`` tokens (first-fit decreasing gives the count; then the sequences
   are spread longest-first over that many micro-batches so they come out even). Every rank gets
   the same number of micro-batches -- megatron's schedule and the gradient all-reduce need that --
   so a rank with less work gets *filler* micro-batches (below).
3. :func:`pack_sequences` concatenates one micro-batch's sequences into a single row
   (:class:`~scope_megatron.batch.PackedMicroBatch`: tokens [1, T], per-token fields
   [1, T], ``cu_seqlens``), and :func:`unpack` cuts any per-token output ([1, T, ...] or [T, ...])
   back into per-sequence tensors.

:func:`build_packed_micro_batches` does all three for one rank.

The padded layout has a planner with the same result type: :func:`plan_padded` deals sequences
round-robin by length over the DP ranks and cuts each share into micro-batches of a fixed number
of sequences; :func:`build_micro_batches` materialises one rank's share of either plan
(:class:`MicroBatchPlan`: ``per_rank``, ``num_micro_batches``, ``padded_positions``, ``filler``).

**A sequence longer than the budget** (``oversize``): ``"alone"`` (default) puts it in a
micro-batch of its own, which then exceeds the budget (a sequence cannot be split over
micro-batches: its tokens attend to each other; context parallelism is the way to split one);
``"error"`` raises ``ValueError`` instead.

**Filler micro-batches** (both layouts): when a rank has fewer sequences than micro-batches (in
particular none at all; padded plans only fill a rank that has none), its extra micro-batches repeat the globally shortest sequence with every per-token value
zeroed except the tokens and targets (so the loss mask is all False), and ``num_loss_tokens = 0``.
They run the forward and backward like any other micro-batch, so no rank waits on another, and
contribute exactly zero to the loss and the gradient. Their ``trajectory_index`` still names that
sequence, so a loss function that looks up per-sequence coefficients works unchanged.

Loss denominators stay global (see ``megatron_step``): how the sequences are grouped changes
nothing but the order of floating-point sums.

Input sequences are dicts of per-token tensors: ``"tokens"`` [L] and any of
:class:`~scope_megatron.batch.TokenFields`' per-token fields ([L] or [L, ...]) by name. The
micro-batch's :class:`~scope_megatron.batch.TokenFields` then hold:

* every per-token field of the input sequences, [1, T] (or [1, T, ...]), zero (False) on padding;
* ``token_trajectory`` [1, T] int64: the index (0..n-1) of the sequence each token belongs to
  (padding belongs to the slot it pads) -- ``objective_loss(..., token_trajectory=...)`` with
  ``coefficients = plan.select(fields.trajectory_index)``;
* ``trajectory_index`` [n] int64: the sequences' indices in the global batch (when given).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Sequence

import torch

from .batch import MicroBatch, PackedMicroBatch, TokenFields, context_parallel_index

logger = logging.getLogger(__name__)
_oversize_warned = False  # the oversize warning is logged once per process (every step would repeat it)

Oversize = Literal["alone", "error"]
Balance = Literal["karmarkar_karp", "greedy"]

__all__ = [
    "MicroBatchPlan",
    "PackedMicroBatch",
    "build_micro_batches",
    "build_packed_micro_batches",
    "context_parallel_seq_multiple",
    "filler_sequence",
    "gather_from_context_parallel",
    "shard_for_context_parallel",
    "pack_sequences",
    "pad_sequences",
    "partition_balanced",
    "plan_packed",
    "plan_padded",
    "rank_share",
    "replan_packed",
    "round_up",
    "unpack",
]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------------------------
# packing one micro-batch
# ------------------------------------------------------------------------------------------------


TOKEN_KEY = "tokens"
# what a sequence dict may hold besides its tokens: TokenFields' per-token fields except the one
# the packer writes itself
SEQUENCE_KEYS = tuple(name for name in TokenFields.PER_TOKEN if name != "token_trajectory")


def _check_sequences(sequences: Sequence[Mapping[str, torch.Tensor]]) -> list[int]:
    if not sequences:
        raise ValueError("nothing to pack: no sequences")
    keys = set(sequences[0])
    if TOKEN_KEY not in keys:
        raise ValueError(f"sequences need a {TOKEN_KEY!r} entry")
    unknown = keys - {TOKEN_KEY, *SEQUENCE_KEYS}
    if unknown:
        raise ValueError(f"sequence keys {sorted(unknown)} are not TokenFields per-token fields {SEQUENCE_KEYS}")
    lengths = []
    for i, seq in enumerate(sequences):
        if set(seq) != keys:
            raise ValueError(f"sequence {i} has keys {sorted(seq)}, sequence 0 has {sorted(keys)}")
        n = seq[TOKEN_KEY].numel()
        if n < 1:
            raise ValueError(f"sequence {i} is empty")
        for key, value in seq.items():
            if value.dim() < 1 or value.shape[0] != n or (key == TOKEN_KEY and value.dim() != 1):
                raise ValueError(f"sequence {i}: {key!r} must be [{n}] or [{n}, ...] (one row per token), "
                                 f"got {tuple(value.shape)}")
            if value.shape[1:] != sequences[0][key].shape[1:]:
                raise ValueError(f"sequence {i}: {key!r} has per-token shape {tuple(value.shape[1:])}, sequence 0 "
                                 f"has {tuple(sequences[0][key].shape[1:])}")
        lengths.append(n)
    return lengths


def pack_sequences(sequences: Sequence[Mapping[str, torch.Tensor]], *,
                   trajectory_index: Sequence[int] | None = None, pad_id: int = 0, seq_multiple: int = 1,
                   total_multiple: int = 1, attention: str = "auto") -> PackedMicroBatch:
    """Concatenate sequences (dicts of per-token tensors of equal length) into one packed row.

    Args:
        sequences: per sequence, ``{"tokens": ids [L], TokenFields per-token field: [L] or [L, ...]}``
            (e.g. a teacher's top-k ids [L, K]); they become [1, T] / [1, T, ...] fields.
        trajectory_index: the sequences' indices in the global batch (``fields.trajectory_index``).
        pad_id: token id of padding tokens. ``num_loss_tokens`` is the sum of ``response_mask``
            (0 without one).
        seq_multiple: pad each sequence's slot to a multiple of this (e.g. 2 * CP for context
            parallelism); recorded in ``cu_seqlens_padded``.
        total_multiple: pad the row to a multiple of this (e.g. TP with sequence parallelism);
            the extra tokens extend the last slot.
        attention: ``PackedMicroBatch.attention``.
    """
    lengths = _check_sequences(sequences)
    if trajectory_index is not None and len(trajectory_index) != len(sequences):
        raise ValueError(f"{len(trajectory_index)} trajectory indices for {len(sequences)} sequences")
    slots = [round_up(n, seq_multiple) for n in lengths]
    total = sum(slots)
    slots[-1] += round_up(total, total_multiple) - total
    total = sum(slots)
    out: dict[str, torch.Tensor] = {}
    for key, first in sequences[0].items():
        fill = pad_id if key == TOKEN_KEY else 0
        row = torch.full((total, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
        start = 0
        for seq, n, slot in zip(sequences, lengths, slots):
            row[start:start + n] = seq[key]
            start += slot
        out[key] = row.unsqueeze(0)
    tokens = out.pop(TOKEN_KEY)
    fields = TokenFields(**out, token_trajectory=torch.repeat_interleave(torch.arange(len(slots)),
                                                                         torch.tensor(slots)).unsqueeze(0),
                         trajectory_index=None if trajectory_index is None else
                         torch.tensor(list(trajectory_index), dtype=torch.long))
    num_loss_tokens = int(fields.response_mask.sum()) if fields.response_mask is not None else 0
    zero = torch.zeros(1, dtype=torch.int32)
    cu = torch.cat([zero, torch.tensor(lengths).cumsum(0).to(torch.int32)])
    cu_padded = torch.cat([zero, torch.tensor(slots).cumsum(0).to(torch.int32)])
    return PackedMicroBatch(tokens, fields, num_loss_tokens, cu_seqlens=cu,
                            cu_seqlens_padded=cu_padded if slots != lengths else None, attention=attention)


def unpack(values: torch.Tensor, mb: PackedMicroBatch) -> list[torch.Tensor]:
    """Per-token outputs of a packed row ([1, T, ...] or [T, ...]) -> per-sequence tensors [L_i, ...].

    Under context parallelism ``values`` must cover the whole row: gather them first with
    :func:`gather_from_context_parallel`.
    """
    total = int(mb.slot_bounds[-1])
    if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == total:
        values = values[0]
    if values.shape[0] != total:
        raise ValueError(f"values {tuple(values.shape)} do not match a packed row of {total} tokens"
                         + (" (gather context-parallel outputs first)" if mb.cp_size > 1 else ""))
    starts = mb.slot_bounds[:-1].tolist()
    return [values[s:s + n] for s, n in zip(starts, mb.seq_lengths.tolist())]


def shard_for_context_parallel(mb: PackedMicroBatch, cp_size: int, cp_rank: int) -> PackedMicroBatch:
    """This CP rank's part of a packed row: chunks r and 2cp-1-r of every slot (cut in 2cp chunks).

    The row must have been packed with ``seq_multiple`` a multiple of ``2 * cp_size``. Per-token
    fields ([1, T]) are sliced like the tokens; ``trajectory_index`` [n] and ``cu_seqlens`` stay
    whole; ``num_loss_tokens`` becomes this rank's share of ``response_mask``.
    """
    if mb.cp_size != 1:
        raise ValueError("this micro-batch is already split for context parallelism")
    if cp_size == 1:
        return mb
    if bool((mb.slot_lengths % (2 * cp_size)).any()):
        raise ValueError(f"slots {mb.slot_lengths.tolist()} are not multiples of 2 * cp = {2 * cp_size}: "
                         f"pack with seq_multiple={2 * cp_size}")
    total = mb.tokens.shape[1]
    index = context_parallel_index(mb.slot_bounds, cp_size, cp_rank).to(mb.tokens.device)
    fields = mb.fields.map(lambda v: v[:, index], per_token_only=True)
    loss_tokens = int(fields.response_mask.sum()) if fields.response_mask is not None else 0
    if mb.num_loss_tokens == 0:
        loss_tokens = 0
    return PackedMicroBatch(mb.tokens[:, index], fields, loss_tokens, cu_seqlens=mb.cu_seqlens,
                            cu_seqlens_padded=mb.cu_seqlens_padded, attention=mb.attention, cp_size=cp_size,
                            cp_rank=cp_rank)


def gather_from_context_parallel(values: torch.Tensor, mb: PackedMicroBatch, group=None) -> torch.Tensor:
    """All-gather a CP rank's per-token outputs ([1, T/cp, ...] or [T/cp, ...]) into the whole row [T, ...].

    ``group`` defaults to megatron's context-parallel group. No gradient flows through the gather.
    """
    import torch.distributed as dist

    if mb.cp_size == 1:
        return values[0] if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == mb.tokens.shape[1] else values
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_context_parallel_group()
    local = values[0] if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == mb.tokens.shape[1] else values
    if local.shape[0] != mb.tokens.shape[1]:
        raise ValueError(f"values {tuple(values.shape)} do not match this rank's {mb.tokens.shape[1]} tokens")
    parts = [torch.empty_like(local) for _ in range(mb.cp_size)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    out = torch.empty((local.shape[0] * mb.cp_size, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        out[context_parallel_index(mb.slot_bounds, mb.cp_size, r).to(local.device)] = part
    return out


def pad_sequences(sequences: Sequence[Mapping[str, torch.Tensor]], *, pad_id: int = 0,
                  trajectory_index: Sequence[int] | None = None, length_multiple: int = 1) -> MicroBatch:
    """The padded layout of the same sequences: a plain :class:`MicroBatch` [n, max L] (right padding),
    the width rounded up to ``length_multiple`` (e.g. TP with sequence parallelism)."""
    lengths = _check_sequences(sequences)
    if trajectory_index is not None and len(trajectory_index) != len(sequences):
        raise ValueError(f"{len(trajectory_index)} trajectory indices for {len(sequences)} sequences")
    width = round_up(max(lengths), length_multiple)
    out = {}
    for key, first in sequences[0].items():
        fill = pad_id if key == TOKEN_KEY else 0
        stacked = torch.full((len(sequences), width, *first.shape[1:]), fill, dtype=first.dtype, device=first.device)
        for i, seq in enumerate(sequences):
            stacked[i, :lengths[i]] = seq[key]
        out[key] = stacked
    tokens = out.pop(TOKEN_KEY)
    fields = TokenFields(**out, trajectory_index=None if trajectory_index is None else
                         torch.tensor(list(trajectory_index), dtype=torch.long))
    num_loss_tokens = int(fields.response_mask.sum()) if fields.response_mask is not None else 0
    return MicroBatch(tokens, fields, num_loss_tokens)


# ------------------------------------------------------------------------------------------------
# balancing over DP ranks and forming micro-batches by a token budget
# ------------------------------------------------------------------------------------------------


def partition_balanced(weights: Sequence[int], k: int, method: Balance = "karmarkar_karp") -> list[list[int]]:
    """Split item indices into ``k`` lists with sums of ``weights`` as even as possible.

    ``"karmarkar_karp"``: k-way largest differencing -- repeatedly merge the two partial
    partitions whose spread (largest minus smallest sum) is largest, joining the largest subset
    of one with the smallest of the other. ``"greedy"``: longest first onto the lightest list.
    Deterministic; each returned list is sorted.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    if method == "greedy":
        parts: list[list[int]] = [[] for _ in range(k)]
        heap = [(0, j) for j in range(k)]
        for i in order:
            total, j = heapq.heappop(heap)
            parts[j].append(i)
            heapq.heappush(heap, (total + weights[i], j))
        return [sorted(p) for p in parts]
    if method != "karmarkar_karp":
        raise ValueError(f"unknown balancing method {method!r}")
    if not weights:
        return [[] for _ in range(k)]
    # heap entries: (-spread, tie-break, [(sum, members)] sorted by sum descending)
    heap = []
    for tie, i in enumerate(order):
        subsets = [(weights[i], [i])] + [(0, []) for _ in range(k - 1)]
        heap.append((-weights[i], tie, subsets))
    heapq.heapify(heap)
    tie = len(order)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ma + mb) for (sa, ma), (sb, mb) in zip(a, reversed(b))]
        merged.sort(key=lambda s: (-s[0], min(s[1], default=len(weights))))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    return [sorted(members) for _, members in heap[0][2]]


def _first_fit_decreasing(items: list[int], weights: Sequence[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(items, key=lambda i: (-weights[i], i)):
        for b, load in enumerate(loads):
            if load + weights[i] <= capacity:
                bins[b].append(i)
                loads[b] += weights[i]
                break
        else:
            bins.append([i])
            loads.append(weights[i])
    return bins


def _spread(items: list[int], weights: Sequence[int], capacity: int, count: int) -> list[list[int]] | None:
    """Longest first onto the lightest of ``count`` bins that has room (an empty bin always has room)."""
    bins: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in sorted(items, key=lambda i: (-weights[i], i)):
        fits = [b for b in range(count) if loads[b] == 0 or loads[b] + weights[i] <= capacity]
        if not fits:
            return None
        b = min(fits, key=lambda b: (loads[b], b))
        bins[b].append(i)
        loads[b] += weights[i]
    return bins


@dataclass
class MicroBatchPlan:
    """Which sequences each DP rank puts into each of its micro-batches, padded or packed.

    ``per_rank[r][m]`` lists the global indices of the sequences in micro-batch ``m`` of DP rank
    ``r``; an empty list is a filler micro-batch (the sequence ``filler``, loss-free: see the
    module docstring). Packed plans give every rank the same number of micro-batches; padded
    plans may differ by one between ranks (the gradient all-reduce runs once, after all of them),
    and give a rank without sequences one filler.
    """

    per_rank: list[list[list[int]]]
    layout: Literal["padded", "packed"]
    padded_positions: int  # positions computed over every rank's real micro-batches, padding included
    filler: int = 0        # the globally shortest sequence (lowest index among equals)
    max_tokens: int | None = None  # packed: the token budget per micro-batch
    oversize: list[int] = field(default_factory=list)  # packed: sequences longer than max_tokens (each alone)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per DP rank (the most any rank has)."""
        return max(len(rank) for rank in self.per_rank)

    def tokens(self, lengths: Sequence[int]) -> list[list[int]]:
        """Tokens per [rank][micro-batch] (fillers count 0)."""
        return [[sum(lengths[i] for i in mb) for mb in rank] for rank in self.per_rank]


def _shortest(weights: Sequence[int]) -> int:
    return min(range(len(weights)), key=lambda i: (weights[i], i)) if weights else 0


def rank_share(lengths: Sequence[int], dp: int, dp_rank: int) -> list[int]:
    """Indices of the sequences a DP rank gets in the padded layout: length-sorted, dealt round-robin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return sorted(order[dp_rank::dp])


def plan_padded(lengths: Sequence[int], *, dp: int = 1, micro_batch_size: int, length_multiple: int = 1) -> MicroBatchPlan:
    """The padded layout: sequences dealt round-robin by length (:func:`rank_share`), cut into
    micro-batches of ``micro_batch_size`` in index order, each padded to its longest sequence
    rounded up to ``length_multiple`` (as :func:`pad_sequences` does)."""
    if dp < 1 or micro_batch_size < 1:
        raise ValueError("dp and micro_batch_size must be >= 1")
    per_rank, padded = [], 0
    for r in range(dp):
        mine = rank_share(lengths, dp, r)
        groups = [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)] or [[]]
        per_rank.append(groups)
        padded += sum(len(g) * round_up(max(lengths[i] for i in g), length_multiple) for g in groups if g)
    return MicroBatchPlan(per_rank=per_rank, layout="padded", padded_positions=padded, filler=_shortest(lengths))


def plan_packed(lengths: Sequence[int], *, max_tokens: int, dp: int = 1, oversize: Oversize = "alone",
                balance: Balance = "karmarkar_karp", seq_multiple: int = 1) -> MicroBatchPlan:
    """Balance sequences over ``dp`` ranks by tokens, then cut each rank's share into micro-batches.

    ``lengths`` are the packed lengths of the global batch (prompt + response - 1 per trajectory);
    each is rounded up to ``seq_multiple`` as :func:`pack_sequences` will. See the module docstring
    for ``oversize`` and fillers.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    if dp < 1:
        raise ValueError("dp must be >= 1")
    weights = [round_up(int(n), seq_multiple) for n in lengths]
    if any(w < 1 for w in weights):
        raise ValueError("every sequence needs at least one token")
    too_long = [i for i, w in enumerate(weights) if w > max_tokens]
    if too_long and oversize == "error":
        raise ValueError(f"{len(too_long)} sequence(s) exceed max_tokens_per_microbatch = {max_tokens} "
                         f"(longest {max(weights[i] for i in too_long)} tokens): raise the budget, or use "
                         f"oversize='alone'")
    if oversize not in ("alone", "error"):
        raise ValueError(f"unknown oversize policy {oversize!r}")
    if too_long:
        global _oversize_warned
        log = logger.debug if _oversize_warned else logger.warning
        _oversize_warned = True
        log("%d sequence(s) longer than max_tokens_per_microbatch = %d each get a micro-batch of their own "
            "(longest %d tokens; said once per process, later ones at DEBUG level)", len(too_long), max_tokens,
            max(weights[i] for i in too_long))
    shares = partition_balanced(weights, dp, balance)
    return MicroBatchPlan(per_rank=_cut_shares(shares, weights, max_tokens), layout="packed",
                          padded_positions=sum(weights), filler=_shortest(weights), max_tokens=max_tokens,
                          oversize=too_long)


def _cut_shares(shares: list[list[int]], weights: Sequence[int], max_tokens: int) -> list[list[list[int]]]:
    """Each rank's share cut into the same number of micro-batches of at most ``max_tokens``."""
    first_fit = [_first_fit_decreasing(share, weights, max_tokens) for share in shares]
    count = max(1, max(len(bins) for bins in first_fit))
    per_rank = []
    for share, bins in zip(shares, first_fit):
        spread = _spread(share, weights, max_tokens, count)
        if spread is None:  # cannot happen for FFD's own count on the rank that set it; others keep FFD
            spread = bins + [[] for _ in range(count - len(bins))]
        # longest micro-batches first (the same order on every rank is not required, but stable)
        spread.sort(key=lambda mb: (-sum(weights[i] for i in mb), min(mb, default=len(weights))))
        per_rank.append([sorted(mb) for mb in spread])
    return per_rank


def replan_packed(plan: MicroBatchPlan, lengths: Sequence[int], *, max_tokens: int,
                  seq_multiple: int = 1) -> MicroBatchPlan:
    """``plan``'s DP shares (every rank keeps its sequences) cut by another token budget.

    For the forward-only lp_old pass: it keeps no activations for a backward, so it can run fewer,
    larger micro-batches than training, and each rank then holds lp_old for exactly the sequences
    it trains on. ``lengths`` and ``seq_multiple`` as given to :func:`plan_packed`.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    weights = [round_up(int(n), seq_multiple) for n in lengths]
    shares = [sorted(i for mb in rank for i in mb) for rank in plan.per_rank]
    return MicroBatchPlan(per_rank=_cut_shares(shares, weights, max_tokens), layout="packed",
                          padded_positions=sum(weights), filler=plan.filler, max_tokens=max_tokens,
                          oversize=[i for i, w in enumerate(weights) if w > max_tokens])


def filler_sequence(sequence: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A loss-free copy of a sequence: its tokens and targets (valid ids), every other field zero."""
    return {key: value if key in (TOKEN_KEY, "targets") else torch.zeros_like(value) for key, value in sequence.items()}


def build_micro_batches(plan: MicroBatchPlan, sequences: Sequence[Mapping[str, torch.Tensor]], *, dp_rank: int = 0,
                        pad_id: int = 0, seq_multiple: int = 1, total_multiple: int = 1, attention: str = "auto",
                        cp_size: int = 1, cp_rank: int = 0) -> list[MicroBatch]:
    """DP rank ``dp_rank``'s micro-batches of ``plan``: only its sequences (and the filler) are read,
    so ``sequences`` may be a lazy sequence that builds each item on access.

    Padded plans give :class:`MicroBatch` [b, s] with ``s`` a multiple of ``total_multiple``;
    packed plans :class:`PackedMicroBatch` rows with slots padded to ``seq_multiple`` and the row
    to ``total_multiple``, cut for context parallelism when ``cp_size > 1`` (the plan must have
    been made with the same ``seq_multiple``, a multiple of ``2 * cp_size``).
    """
    if not 0 <= dp_rank < len(plan.per_rank):
        raise ValueError(f"plan is for {len(plan.per_rank)} DP ranks; asked for rank {dp_rank}")
    if plan.layout == "padded" and cp_size > 1:
        raise ValueError("context parallelism needs packed micro-batches")
    out: list[MicroBatch] = []
    for members in plan.per_rank[dp_rank]:
        seqs = [sequences[i] for i in members] or [filler_sequence(sequences[plan.filler])]
        index = members or [plan.filler]
        if plan.layout == "padded":
            mb = pad_sequences(seqs, trajectory_index=index, pad_id=pad_id, length_multiple=total_multiple)
        else:
            mb = pack_sequences(seqs, trajectory_index=index, pad_id=pad_id, seq_multiple=seq_multiple,
                                total_multiple=total_multiple, attention=attention)
        out.append(mb)
    if plan.layout == "packed":
        out = [shard_for_context_parallel(mb, cp_size, cp_rank) for mb in out]
    return out


def build_packed_micro_batches(sequences: Sequence[Mapping[str, torch.Tensor]], *, max_tokens: int, dp: int = 1,
                               dp_rank: int = 0, oversize: Oversize = "alone", balance: Balance = "karmarkar_karp",
                               pad_id: int = 0, seq_multiple: int = 1, total_multiple: int = 1,
                               attention: str = "auto", cp_size: int = 1, cp_rank: int = 0) -> list[PackedMicroBatch]:
    """This DP rank's packed micro-batches for the global batch ``sequences`` (same on every rank):
    :func:`plan_packed` on their lengths, then :func:`build_micro_batches`.

    Context parallelism (``cp_size > 1``): slots are padded to a multiple of ``2 * cp_size`` and
    each micro-batch is cut with :func:`shard_for_context_parallel` for ``cp_rank``. The budget
    ``max_tokens`` counts the whole packed row (each CP rank holds ``1 / cp_size`` of it).
    """
    seq_multiple = context_parallel_seq_multiple(cp_size, seq_multiple)
    plan = plan_packed(_check_sequences(sequences), max_tokens=max_tokens, dp=dp, oversize=oversize, balance=balance,
                       seq_multiple=seq_multiple)
    if len(plan.per_rank) != dp or not 0 <= dp_rank < dp:
        raise ValueError(f"plan is for {len(plan.per_rank)} DP ranks; asked for rank {dp_rank} of {dp}")
    return build_micro_batches(plan, sequences, dp_rank=dp_rank, pad_id=pad_id, seq_multiple=seq_multiple,
                               total_multiple=total_multiple, attention=attention, cp_size=cp_size, cp_rank=cp_rank)


def context_parallel_seq_multiple(cp_size: int, seq_multiple: int = 1) -> int:
    """The slot multiple packing needs: ``seq_multiple`` made a multiple of ``2 * cp_size`` under CP."""
    if cp_size <= 1:
        return seq_multiple
    return seq_multiple * (2 * cp_size) // math.gcd(seq_multiple, 2 * cp_size)
