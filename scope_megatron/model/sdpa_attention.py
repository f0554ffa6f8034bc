"""A megatron-core core-attention module backed by ``torch.nn.functional.scaled_dot_product_attention``.

Used in the local (non-Transformer-Engine) layer spec instead of megatron's unfused
``DotProductAttention``: same inputs and outputs, but flash / memory-efficient kernels on GPU
(about 3x the tokens/s of the unfused path at 4k tokens on an H100) and no [b, np, s, s]
score buffer. Causal masking comes from SDPA itself; an explicit boolean mask
(True = masked, megatron's convention) is honoured when given.

Packed sequences (THD, ``PackedSeqParams`` with ``cu_seqlens``): megatron squeezes the batch
dimension and applies RoPE per sequence before core attention; this module then runs causal SDPA
on each sequence's slot separately, so no [T, T] mask is built and attention never crosses a
sequence boundary.

Context parallelism with packed sequences (a CPU / fallback path; Transformer Engine's ring
attention is the fast one): each CP rank holds chunks r and 2cp-1-r of every sequence (megatron's
load-balanced layout); keys and values are all-gathered over the CP group (the backward pass
all-reduces their gradients and keeps this rank's part), and each local query attends causally
to the keys of its own sequence by global position. Memory: the whole row's K/V on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def _cp_world_size() -> int:
    from megatron.core import parallel_state as ps

    group = ps.get_context_parallel_group(check_initialized=False)
    return group.size() if group is not None else 1


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over ``group`` (rank order); backward: sum the gradients, keep this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = ctx.group.rank()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows], None


class SDPAttention(DotProductAttention):
    """Drop-in core attention: [sq, b, np, hn] query and [sk, b, ng, hn] key/value -> [sq, b, hp]."""

    def __init__(self, config, *args, **kwargs):
        # megatron's DotProductAttention refuses context_parallel_size > 1; this class handles CP itself
        # (packed sequences only), so build the base with the check satisfied and restore the setting.
        cp = config.context_parallel_size
        config.context_parallel_size = 1
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.context_parallel_size = cp

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, attention_mask, packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by SDPAttention")
        if self.config.context_parallel_size > 1 or _cp_world_size() > 1:
            raise NotImplementedError("context parallelism needs packed micro-batches (PackedSeqParams)")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        dropout_p = self.attention_dropout.p if self.training else 0.0
        if attention_mask is not None:
            # megatron masks are True where attention is NOT allowed; SDPA wants True = attend.
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout_p,
                                                     scale=self.softmax_scale)
        else:
            is_causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
            context = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p,
                                                     scale=self.softmax_scale)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(context.size(0), context.size(1), self.hidden_size_per_partition)

    def _forward_packed(self, query, key, value, attention_mask, packed_seq_params):
        """THD: query [T, np, hn], key / value [T, ng, hn] -> [T, hp]; causal SDPA per sequence slot."""
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(f"packed format {packed_seq_params.qkv_format!r} is not supported")
        if attention_mask is not None:
            raise ValueError("packed sequences take their boundaries from cu_seqlens, not an attention mask")
        cp_group = packed_seq_params.cp_group
        if cp_group is not None and cp_group.size() > 1:
            return self._forward_packed_cp(query, key, value, packed_seq_params, cp_group)
        bounds = packed_seq_params.cu_seqlens_q_padded
        if bounds is None:
            bounds = packed_seq_params.cu_seqlens_q
        kv_bounds = packed_seq_params.cu_seqlens_kv_padded
        if kv_bounds is None:
            kv_bounds = packed_seq_params.cu_seqlens_kv
        if bounds is None:
            raise ValueError("packed sequences need cu_seqlens_q")
        if kv_bounds is not None and not torch.equal(kv_bounds.cpu(), bounds.cpu()):
            raise NotImplementedError("SDPAttention needs the same query and key/value sequence boundaries")
        total = query.shape[0]
        bounds = [int(b) for b in bounds.tolist()]
        if bounds[0] != 0 or bounds[-1] > total:
            raise ValueError(f"cu_seqlens {bounds} do not fit {total} packed tokens")
        if bounds[-1] < total:  # trailing tokens outside every sequence: one more segment
            bounds.append(total)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        dropout_p = self.attention_dropout.p if self.training else 0.0
        # [T, n, hn] -> [1, n, T, hn]
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        pieces = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True,
                    dropout_p=dropout_p, scale=self.softmax_scale))
        context = torch.cat(pieces, dim=2)  # [1, np, T, hn]
        context = context[0].permute(1, 0, 2).contiguous()  # [T, np, hn]
        return context.view(total, self.hidden_size_per_partition)

    def _forward_packed_cp(self, query, key, value, packed_seq_params, cp_group):
        """THD under context parallelism: local queries [T/cp, np, hn] against the gathered keys of their sequence."""
        from ..batch import context_parallel_index

        bounds = packed_seq_params.cu_seqlens_q_padded
        if bounds is None:
            bounds = packed_seq_params.cu_seqlens_q
        cp, rank = cp_group.size(), cp_group.rank()
        local_rows = query.shape[0]
        # where each gathered row (rank-major: rank 0's T/cp rows, then rank 1's, ...) sits in the whole row
        owner_positions = torch.cat([context_parallel_index(bounds, cp, r) for r in range(cp)])
        order = torch.empty_like(owner_positions)
        order[owner_positions] = torch.arange(owner_positions.numel())
        order = order.to(query.device)
        k_full = _GatherSequence.apply(key, cp_group)[order]  # [T, ng, hn] in row order
        v_full = _GatherSequence.apply(value, cp_group)[order]
        q_positions = context_parallel_index(bounds, cp, rank).to(query.device)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        dropout_p = self.attention_dropout.p if self.training else 0.0
        bounds = [int(b) for b in bounds.tolist()]
        pieces, offset = [], 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            n_local = (end - start) // cp
            pos = q_positions[offset:offset + n_local] - start  # [n_local] positions inside the sequence
            q = query[offset:offset + n_local].permute(1, 0, 2).unsqueeze(0)  # [1, np, n_local, hn]
            k, v = (t[start:end].permute(1, 0, 2).unsqueeze(0) for t in (k_full, v_full))  # [1, ng, L, hn]
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            allowed = torch.arange(end - start, device=query.device)[None, :] <= pos[:, None]  # True = attend
            pieces.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                                         scale=self.softmax_scale))
            offset += n_local
        if offset != local_rows:
            raise ValueError(f"cu_seqlens cover {offset} local tokens, the input has {local_rows}")
        context = torch.cat(pieces, dim=2)[0].permute(1, 0, 2).contiguous()  # [T/cp, np, hn]
        return context.view(local_rows, self.hidden_size_per_partition)
