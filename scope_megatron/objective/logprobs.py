"""Vocabulary-parallel token log-probs, entropy and top-k KL.

Under tensor parallelism each rank holds a contiguous slice of the (padded) vocabulary:
rank r of a TP group of size tp owns global ids ``[r * V_local, (r + 1) * V_local)`` with
``V_local = V_padded / tp``; ids ``>= vocab_size`` are padding and are excluded from the softmax
(they get probability 0 and zero gradient). Nothing here gathers the full vocabulary.

One autograd Function, :class:`_VocabParallelGatherLogprobs`, returns for each token the
log-probs of M requested global ids (column 0: the sampled token; more columns: e.g. the
teacher's top-k ids) and, optionally, the entropy of the token distribution. With
``z = logits / temperature`` (fp32, computed chunk by chunk from the logits' own dtype):

Forward (one read of the logits)
  1. per token, per rank: ``m_r = max_{j in V_r} z_j``, ``S_r = sum e^{z_j - m_r}``,
     ``T_r = sum e^{z_j - m_r} (z_j - m_r)``; the raw ``z_id`` of requested ids this rank owns.
  2. all-reduce MAX of ``m_r`` -> ``m`` (N floats).
  3. rescale to the common shift: ``S_r <- e^{m_r - m} S_r``,
     ``T_r <- e^{m_r - m} (T_r + (m_r - m) S_r)``, ``z'_id = z_id - m`` (0 where not owned).
  4. one all-reduce SUM of the packed [N, 2 + M] buffer -> ``S, T, z'_id``.
  5. ``log p(id) = z'_id - log S``; entropy ``H = log S - T / S``.

Backward (no communication). With ``c_k = dL/d log p(id_k)`` and ``g_H = dL/dH``:
  ``dL/dz_j = sum_k c_k [j = id_k] - p_j sum_k c_k - g_H p_j (log p_j + H)``,
  where ``p_j = exp(z_j - m - log S)`` is recomputed chunk by chunk from the saved logits;
  ``dL/dlogits = dL/dz / temperature``, returned in the logits' dtype.

  The dense part ``-p_j (...)`` is computed chunk by chunk; then the few entries at the requested
  ids this rank owns are overwritten by their exact value (one-hot terms included) computed on
  the small [N, M] tensor, so every gradient entry is rounded to the logits' dtype exactly once.

Saved for backward: the input logits themselves (no copy, no fp32 upcast) and O(N·M) statistics.
Peak extra memory: the gradient (logits' dtype) plus, per chunk, two fp32 [chunk, V_local] buffers
(eager) or one buffer in the logits' dtype (``fused=True``: torch.compile'd chunk kernels, the
default on CUDA). The chunk holds ``DEFAULT_CHUNK_ELEMENTS`` (8 Mi) elements by default.

Contract: every rank of the TP group calls with the same ``target_ids`` (global ids) and the
loss computed from the outputs is the same on every TP rank (so each rank receives the same
upstream gradient), as in megatron's vocab-parallel cross-entropy.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TopkDirection = Literal["forward", "reverse"]

# fp32 elements per backward/forward chunk buffer (~32 MiB each): bounds the temporaries.
DEFAULT_CHUNK_ELEMENTS = 8 * 1024 * 1024


def resolve_tp_group(tp_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to reduce over: ``tp_group`` if given, else megatron's TP group if megatron's
    model parallelism is initialised, else None (a single rank, no communication).

    megatron is never imported here: if ``megatron.core.parallel_state`` was not imported by the
    program, model parallelism cannot have been initialised.
    """
    if tp_group is not None:
        return tp_group
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _group_rank_and_size(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 logits; fp64 logits stay fp64 (exact gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# per-chunk kernels. The eager versions work in place on one fp32 copy of the chunk (bounded
# memory); the "pure" versions hold the same math without in-place ops so that torch.compile can
# fuse each into one pass over the logits (``fused=True``; the default on CUDA).
# --------------------------------------------------------------------------------------------


def _stats_chunk_eager(x: torch.Tensor, inv_t: float, with_entropy: bool, dtype: torch.dtype):
    """x [c, V_valid] (logits' dtype) -> local max m_r, sum e^(z-m_r), sum e^(z-m_r)(z-m_r), each [c]."""
    shifted = x.to(dtype, copy=True)  # [c, V_valid] fp32 work copy (never the caller's tensor)
    if inv_t != 1.0:
        shifted.mul_(inv_t)
    chunk_max = shifted.amax(dim=-1)
    shifted.sub_(chunk_max.unsqueeze(-1))  # z - m_r <= 0
    exp_shifted = torch.exp(shifted)
    sum_exp = exp_shifted.sum(dim=-1)
    sum_exp_z = exp_shifted.mul_(shifted).sum(dim=-1) if with_entropy else torch.zeros_like(sum_exp)
    return chunk_max, sum_exp, sum_exp_z


def _stats_chunk_pure(x: torch.Tensor, inv_t: float, with_entropy: bool, dtype: torch.dtype):
    """Same as :func:`_stats_chunk_eager`, without in-place ops (for torch.compile)."""
    z = x.to(dtype) * inv_t
    chunk_max = z.amax(dim=-1)
    shifted = z - chunk_max.unsqueeze(-1)
    exp_shifted = torch.exp(shifted)
    sum_exp = exp_shifted.sum(dim=-1)
    sum_exp_z = (exp_shifted * shifted).sum(dim=-1) if with_entropy else torch.zeros_like(sum_exp)
    return chunk_max, sum_exp, sum_exp_z


def _grad_chunk_eager(x: torch.Tensor, log_normalizer: torch.Tensor, coeff_sum: torch.Tensor,
                      grad_entropy: torch.Tensor | None, entropy: torch.Tensor, inv_t: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """dL/dlogits on a chunk, without the one-hot terms: ``-p_j (sum_k c_k + g_H (log p_j + H)) / T``.

    x [c, V_valid]; log_normalizer (m + log S), coeff_sum, grad_entropy, entropy: [c, 1].
    Returns [c, V_valid] in x's dtype.
    """
    log_p = x.to(dtype, copy=True)
    if inv_t != 1.0:
        log_p.mul_(inv_t)
    log_p.sub_(log_normalizer)  # log p_j
    p = torch.exp(log_p)
    if grad_entropy is not None:
        grad = log_p.add_(entropy).mul_(grad_entropy).add_(coeff_sum).mul_(p)
        del p
    else:
        grad = p.mul_(coeff_sum)
        del log_p
    return grad.mul_(-inv_t).to(x.dtype)


def _grad_chunk_pure(x: torch.Tensor, log_normalizer: torch.Tensor, coeff_sum: torch.Tensor,
                     grad_entropy: torch.Tensor | None, entropy: torch.Tensor, inv_t: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """Same as :func:`_grad_chunk_eager`, without in-place ops (for torch.compile)."""
    log_p = x.to(dtype) * inv_t - log_normalizer
    inner = coeff_sum if grad_entropy is None else coeff_sum + grad_entropy * (log_p + entropy)
    return (torch.exp(log_p) * inner * (-inv_t)).to(x.dtype)


_COMPILED: dict[str, object] = {}
_COMPILE_FAILED = False


def _chunk_kernels(fused: bool):
    """(stats, grad) chunk functions: compiled pure versions if ``fused``, else the eager ones."""
    global _COMPILE_FAILED
    if not fused or _COMPILE_FAILED:
        return _stats_chunk_eager, _grad_chunk_eager
    if not _COMPILED:
        try:
            _COMPILED["stats"] = torch.compile(_stats_chunk_pure, dynamic=True)
            _COMPILED["grad"] = torch.compile(_grad_chunk_pure, dynamic=True)
        except Exception as error:  # pragma: no cover - depends on the installation
            logger.warning("torch.compile unavailable (%s); vocab-parallel log-probs run eagerly", error)
            _COMPILE_FAILED = True
            return _stats_chunk_eager, _grad_chunk_eager
    return _COMPILED["stats"], _COMPILED["grad"]


def _run_kernel(fused: bool, which: int, *args):
    """Call a chunk kernel; a failing compiled kernel falls back to eager once, with a warning."""
    global _COMPILE_FAILED
    kernel = _chunk_kernels(fused)[which]
    if kernel is _stats_chunk_eager or kernel is _grad_chunk_eager:
        return kernel(*args)
    try:
        return kernel(*args)
    except Exception as error:  # pragma: no cover - depends on the installation
        logger.warning("compiled vocab-parallel kernel failed (%s); falling back to eager", error)
        _COMPILE_FAILED = True
        return (_stats_chunk_eager, _grad_chunk_eager)[which](*args)


def _exact_grad_at_ids(logits: torch.Tensor, safe_local_ids: torch.Tensor, owned: torch.Tensor, coeff: torch.Tensor,
                       coeff_sum: torch.Tensor, log_normalizer: torch.Tensor, grad_entropy: torch.Tensor | None,
                       entropy: torch.Tensor, inv_t: float, dtype: torch.dtype) -> torch.Tensor:
    """The full fp32 gradient at the requested ids this rank owns, one-hot terms included: [N, M].

    ``sum_{k: id_k = id_m} c_k - p_m (sum_k c_k + g_H (log p_m + H))``, over T; duplicates among the
    ids (e.g. the sampled token inside the teacher's top-k) get the same, complete value.
    """
    log_p = logits.gather(1, safe_local_ids).to(dtype) * inv_t - log_normalizer  # [N, M]
    inner = coeff_sum if grad_entropy is None else coeff_sum + grad_entropy * (log_p + entropy)
    coeff_owned = torch.where(owned, coeff, torch.zeros_like(coeff))
    same_id = (safe_local_ids.unsqueeze(-1) == safe_local_ids.unsqueeze(-2)) & owned.unsqueeze(-2)  # [N, M, M]
    one_hot = (same_id.to(dtype) * coeff_owned.unsqueeze(-2)).sum(dim=-1)  # [N, M]
    return (one_hot - torch.exp(log_p) * inner) * inv_t


class _VocabParallelGatherLogprobs(torch.autograd.Function):
    """log p(ids) [N, M] and entropy [N] from vocab-parallel logits [N, V_local] (see module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,  # [N, V_local], any float dtype, kept (not copied) for backward
        ids: torch.Tensor,  # [N, M] int64 global ids in [0, vocab_size)
        vocab_start: int,
        num_valid_local: int,  # columns [0, num_valid_local) of this shard are real vocabulary
        inv_temperature: float,
        tp_group: dist.ProcessGroup | None,
        tp_size: int,
        with_entropy: bool,
        chunk_tokens: int,
        fused: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = logits.shape[0]
        device = logits.device
        f32 = _compute_dtype(logits.dtype)
        local_ids = ids - vocab_start  # [N, M]
        owned = (local_ids >= 0) & (local_ids < num_valid_local)  # [N, M]
        safe_local_ids = torch.where(owned, local_ids, torch.zeros_like(local_ids))

        # 1. one pass over the shard: local max and sums relative to it, chunk by chunk.
        local_max = torch.full((num_tokens,), -math.inf, dtype=f32, device=device)  # [N]
        local_sum_exp = torch.zeros(num_tokens, dtype=f32, device=device)  # [N]
        local_sum_exp_z = torch.zeros(num_tokens, dtype=f32, device=device)  # [N] (entropy only)
        if num_valid_local > 0:
            for start in range(0, num_tokens, chunk_tokens):
                stop = min(start + chunk_tokens, num_tokens)
                chunk = logits[start:stop, :num_valid_local]  # [c, V_valid] view
                stats = _run_kernel(fused, 0, chunk, inv_temperature, with_entropy, f32)
                local_max[start:stop], local_sum_exp[start:stop], local_sum_exp_z[start:stop] = stats
                del stats

        # 2. global max (MAX all-reduce of N floats).
        global_max = local_max.clone()
        if tp_size > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)

        # 3. rescale the partial sums to the common shift; ranks with no valid column add 0.
        has_columns = local_sum_exp > 0
        delta = torch.where(has_columns, local_max - global_max, torch.zeros_like(local_max))  # m_r - m <= 0
        scale = torch.where(has_columns, torch.exp(delta), torch.zeros_like(delta))
        partial_sum_exp = local_sum_exp * scale
        partial_sum_exp_z = scale * (local_sum_exp_z + delta * local_sum_exp)
        target_z = logits.gather(1, safe_local_ids).to(f32)  # [N, M], exact upcast of the stored logits
        if inv_temperature != 1.0:
            target_z = target_z * inv_temperature
        target_z = torch.where(owned, target_z - global_max.unsqueeze(-1), torch.zeros_like(target_z))

        # 4. one SUM all-reduce of [N, 2 + M].
        packed = torch.cat([partial_sum_exp.unsqueeze(-1), partial_sum_exp_z.unsqueeze(-1), target_z], dim=-1)
        if tp_size > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, sum_exp_z, target_z = packed[:, 0], packed[:, 1], packed[:, 2:]

        # 5. log-probs and entropy.
        log_sum_exp = torch.log(sum_exp)  # [N]
        logprobs = target_z - log_sum_exp.unsqueeze(-1)  # [N, M]
        if with_entropy:
            entropy = log_sum_exp - sum_exp_z / sum_exp  # [N]
        else:
            entropy = torch.zeros(num_tokens, dtype=f32, device=device)
            ctx.mark_non_differentiable(entropy)

        ctx.save_for_backward(logits, safe_local_ids, owned, global_max + log_sum_exp, entropy)
        ctx.num_valid_local = num_valid_local
        ctx.inv_temperature = inv_temperature
        ctx.chunk_tokens = chunk_tokens
        ctx.with_entropy = with_entropy
        ctx.fused = fused
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None):  # type: ignore[override]
        logits, safe_local_ids, owned, log_normalizer, entropy = ctx.saved_tensors
        num_tokens = logits.shape[0]
        num_valid = ctx.num_valid_local
        inv_t = ctx.inv_temperature
        f32 = _compute_dtype(logits.dtype)
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 10

        if grad_logprobs is None:
            grad_logprobs = torch.zeros(owned.shape, dtype=f32, device=logits.device)
        coeff = grad_logprobs.to(f32)  # [N, M] c_k
        coeff_sum = coeff.sum(dim=-1, keepdim=True)  # [N, 1]  sum_k c_k (every rank sees every id)
        log_normalizer = log_normalizer.unsqueeze(-1)  # [N, 1]  m + log S
        entropy = entropy.unsqueeze(-1)  # [N, 1]
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(f32).unsqueeze(-1)  # [N, 1]

        grad_logits = torch.empty_like(logits)  # [N, V_local], logits' dtype
        if num_valid < logits.shape[1]:
            grad_logits[:, num_valid:].zero_()  # padded vocabulary columns
        if num_valid > 0:
            # dense part, -p_j (sum_k c_k + g_H (log p_j + H)) / T, chunk by chunk ...
            for start in range(0, num_tokens, ctx.chunk_tokens):
                stop = min(start + ctx.chunk_tokens, num_tokens)
                rows = slice(start, stop)
                grad_logits[rows, :num_valid] = _run_kernel(
                    ctx.fused, 1, logits[rows, :num_valid], log_normalizer[rows], coeff_sum[rows],
                    None if grad_entropy is None else grad_entropy[rows], entropy[rows], inv_t, f32)
            # ... then the requested ids this rank owns are overwritten with their exact fp32 value
            # (one-hot terms included), rounded once to the logits' dtype.
            exact = _exact_grad_at_ids(logits, safe_local_ids, owned, coeff, coeff_sum, log_normalizer,
                                       grad_entropy, entropy, inv_t, f32)
            token_index = torch.arange(num_tokens, device=logits.device).unsqueeze(-1).expand_as(owned)
            grad_logits[token_index[owned], safe_local_ids[owned]] = exact[owned].to(grad_logits.dtype)
        return grad_logits, None, None, None, None, None, None, None, None, None


class TokenLogprobStats(NamedTuple):
    """Outputs of :func:`gather_vocab_parallel_logprobs`."""

    logprobs: torch.Tensor  # [..., M] fp32 log p(ids)
    entropy: torch.Tensor | None  # [...] fp32 entropy of the token distribution, or None


def gather_vocab_parallel_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    chunk_tokens: int | None = None,
    check_finite: bool = True,
    fused: bool | None = None,
) -> TokenLogprobStats:
    """Log-probs of several global ids per token, and optionally the entropy, in one pass.

    Args:
        logits: [..., V_local] this rank's slice of the padded vocabulary (fp32, bf16 or fp16),
            contiguous (a non-contiguous input is copied by the flattening).
        ids: [..., M] integer global token ids in ``[0, vocab_size)`` (same on every TP rank).
        vocab_size: the true (unpadded) vocabulary size; columns at or beyond it are excluded.
        temperature: the softmax is ``log_softmax(logits / temperature)`` (> 0).
        tp_group: the tensor-parallel group (see :func:`resolve_tp_group` for None).
        return_entropy: also return the per-token entropy (differentiable), at no extra
            communication.
        chunk_tokens: tokens per fp32 work buffer; default keeps one buffer near 32 MiB.
        check_finite: raise if the outputs are NaN/inf (non-finite logits); one host sync.
        fused: run the per-chunk math as torch.compile'd kernels (one pass over the logits each
            way); None = on CUDA only. Falls back to eager, with a warning, if compilation fails.

    Returns:
        :class:`TokenLogprobStats` ``(logprobs [..., M] fp32, entropy [...] fp32 or None)``.
    """
    group = resolve_tp_group(tp_group)
    rank, tp_size = _group_rank_and_size(group)
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    if not isinstance(ids, torch.Tensor) or ids.dtype == torch.bool or ids.is_floating_point():
        raise TypeError(f"ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.dim() != logits.dim() or tuple(ids.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(f"ids {tuple(ids.shape)} must be [..., M] with the leading shape of logits "
                         f"{tuple(logits.shape)}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    local_vocab = logits.shape[-1]
    if local_vocab * tp_size < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} exceeds the padded vocabulary {local_vocab} x tp {tp_size}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if ids.numel() and bool(((ids < 0) | (ids >= vocab_size)).any()):
        bad = ids[(ids < 0) | (ids >= vocab_size)][:8].tolist()
        raise ValueError(f"ids must be global token ids in [0, {vocab_size}); got e.g. {bad} "
                         "(replace ignored positions by any valid id and mask them in the loss)")

    leading = logits.shape[:-1]
    logits_2d = logits.reshape(-1, local_vocab)  # [N, V_local]
    ids_2d = ids.reshape(-1, ids.shape[-1]).long()  # [N, M]
    vocab_start = rank * local_vocab
    num_valid_local = max(0, min(local_vocab, vocab_size - vocab_start))
    if chunk_tokens is None:
        chunk_tokens = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, num_valid_local))
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")

    logprobs, entropy = _VocabParallelGatherLogprobs.apply(
        logits_2d, ids_2d, vocab_start, num_valid_local, 1.0 / float(temperature), group, tp_size,
        return_entropy, chunk_tokens, logits.is_cuda if fused is None else bool(fused))
    if check_finite:
        finite = torch.isfinite(logprobs).all() & torch.isfinite(entropy).all()
        if not bool(finite):
            raise ValueError("logits hold NaN/inf values: the log-probs are not finite")
    logprobs = logprobs.reshape(*leading, ids.shape[-1])
    return TokenLogprobStats(logprobs, entropy.reshape(leading) if return_entropy else None)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    chunk_tokens: int | None = None,
    check_finite: bool = True,
    fused: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``log_softmax(logits / temperature)`` at ``target_ids``, under vocab parallelism.

    Args:
        logits: [..., V_padded / tp] this rank's vocabulary slice (e.g. megatron's [s, b, V/tp]).
        target_ids: [...] global token ids in ``[0, vocab_size)``.
        vocab_size, temperature, tp_group, chunk_tokens, check_finite, fused: as in
            :func:`gather_vocab_parallel_logprobs`.
        return_entropy: if True return ``(logprobs, entropy)``, both [...] fp32.

    Returns:
        [...] fp32 log-probs with gradients to ``logits`` (or the pair above).
    """
    if not isinstance(target_ids, torch.Tensor):
        raise TypeError("target_ids must be a tensor")
    if tuple(target_ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must have the shape of logits without "
                         f"its last dimension {tuple(logits.shape[:-1])}")
    stats = gather_vocab_parallel_logprobs(
        logits, target_ids.unsqueeze(-1), vocab_size=vocab_size, temperature=temperature, tp_group=tp_group,
        return_entropy=return_entropy, chunk_tokens=chunk_tokens, check_finite=check_finite, fused=fused)
    logprobs = stats.logprobs.squeeze(-1)
    if return_entropy:
        assert stats.entropy is not None
        return logprobs, stats.entropy
    return logprobs


# --------------------------------------------------------------------------------------------
# top-k KL (beyond the paper)
# --------------------------------------------------------------------------------------------


def topk_kl(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    direction: TopkDirection = "forward",
    tail: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-position KL between the teacher's top-k distribution and the student at the same ids.

    Args:
        student_topk_logprobs: [..., K] student log p at the teacher's top-k ids (with grad).
        teacher_topk_logprobs: [..., K] teacher log q at those ids (no grad is taken); ``-inf``
            marks an absent entry (a teacher id the student does not have): the result is that
            of the row without it, on both sides (a row with no entry gives 0).
        direction: ``"forward"`` = KL(teacher || student), ``"reverse"`` = KL(student || teacher).
        tail: False: the teacher is renormalised on its top-k (q~ = q / sum_K q); forward is
            ``sum_K q~ (log q~ - log p)`` (the student is not renormalised, so its mass is pulled
            into the top-k set; >= 0), reverse renormalises both, ``sum_K p~ (log p~ - log q~)``.
            True: both distributions are coarse-grained to K + 1 categories (the K ids and one
            "rest" bucket, tails clamped at ``eps``); exact KL of the coarse-grainings, a lower
            bound of the full-vocabulary KL.
    Returns:
        [...] fp32 (fp64 for fp64 input) KL per position, differentiable in the student log-probs.
    """
    if student_topk_logprobs.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"student_topk_logprobs {tuple(student_topk_logprobs.shape)} and teacher_topk_logprobs "
                         f"{tuple(teacher_topk_logprobs.shape)} must have the same shape")
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    dtype = _compute_dtype(student_topk_logprobs.dtype)
    log_p = student_topk_logprobs.to(dtype)
    log_q = teacher_topk_logprobs.detach().to(dtype)
    present = log_q > float("-inf")  # [..., K]
    if not bool(present.all()):
        return _topk_kl_masked(log_p, log_q, present, direction=direction, tail=tail, eps=eps)
    if not tail:
        log_q_renorm = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
        if direction == "forward":
            return (log_q_renorm.exp() * (log_q_renorm - log_p)).sum(dim=-1)
        log_p_renorm = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        return (log_p_renorm.exp() * (log_p_renorm - log_q_renorm)).sum(dim=-1)
    # rest-of-vocabulary bucket: 1 - sum_K p = -expm1(logsumexp(log p)), accurate near 1.
    log_p_tail = torch.log((-torch.expm1(torch.logsumexp(log_p, dim=-1).clamp(max=0.0))).clamp(min=eps))
    log_q_tail = torch.log((-torch.expm1(torch.logsumexp(log_q, dim=-1).clamp(max=0.0))).clamp(min=eps))
    if direction == "forward":
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1) + log_q_tail.exp() * (log_q_tail - log_p_tail)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1) + log_p_tail.exp() * (log_p_tail - log_q_tail)


def _topk_kl_masked(log_p: torch.Tensor, log_q: torch.Tensor, present: torch.Tensor, *, direction: str, tail: bool,
                    eps: float) -> torch.Tensor:
    """:func:`topk_kl` over the ``present`` entries only (absent ones drop out of every sum).

    Absent slots enter the log-sum-exps as ``-inf`` and the sums as 0; a row with no present
    entry keeps its own finite values inside the log-sum-exps (so no NaN reaches the gradient)
    and its result is set to 0.
    """
    any_present = present.any(dim=-1, keepdim=True)  # [..., 1]
    keep = present | ~any_present  # slots that enter the log-sum-exps
    neg_inf = torch.tensor(float("-inf"), dtype=log_p.dtype, device=log_p.device)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    lp_in = torch.where(keep, log_p, neg_inf)
    lq_in = torch.where(present, log_q, torch.where(keep, zero, neg_inf))
    lse_p = torch.logsumexp(lp_in, dim=-1, keepdim=True)
    lse_q = torch.logsumexp(lq_in, dim=-1, keepdim=True)
    lp = torch.where(present, log_p, zero)  # finite everywhere
    lq = torch.where(present, log_q, zero)
    if not tail:
        lq_renorm = lq - lse_q
        q = torch.where(present, lq_renorm.exp(), zero)
        if direction == "forward":
            kl = (q * (lq_renorm - lp)).sum(dim=-1)
        else:
            lp_renorm = lp - lse_p
            p = torch.where(present, lp_renorm.exp(), zero)
            kl = (p * (lp_renorm - lq_renorm)).sum(dim=-1)
        return torch.where(any_present.squeeze(-1), kl, zero)
    lse_p = torch.where(any_present, lse_p, neg_inf)  # no entry: the whole mass is in the rest bucket
    lse_q = torch.where(any_present, lse_q, neg_inf)
    log_p_tail = torch.log((-torch.expm1(lse_p.squeeze(-1).clamp(max=0.0))).clamp(min=eps))
    log_q_tail = torch.log((-torch.expm1(lse_q.squeeze(-1).clamp(max=0.0))).clamp(min=eps))
    p, q = torch.where(present, lp.exp(), zero), torch.where(present, lq.exp(), zero)
    if direction == "forward":
        return (q * (lq - lp)).sum(dim=-1) + log_q_tail.exp() * (log_q_tail - log_p_tail)
    return (p * (lp - lq)).sum(dim=-1) + log_p_tail.exp() * (log_p_tail - log_q_tail)


class TopkKLResult(NamedTuple):
    """Outputs of :func:`vocab_parallel_topk_kl`."""

    target_logprobs: torch.Tensor  # [...] fp32 log p(sampled token)
    topk_kl: torch.Tensor  # [...] fp32 KL per position
    entropy: torch.Tensor | None  # [...] fp32, if requested


def vocab_parallel_topk_kl(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    vocab_size: int,
    direction: TopkDirection = "forward",
    tail: bool = False,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    return_entropy: bool = False,
    chunk_tokens: int | None = None,
    check_finite: bool = True,
    fused: bool | None = None,
) -> TopkKLResult:
    """Sampled-token log-prob and top-k KL to the teacher in ONE pass over the logits.

    Each rank handles the top-k ids that fall in its vocabulary slice; the KL itself is an
    elementwise function of the small [..., K] log-prob tensor (see :func:`topk_kl`), so its
    gradient flows back through the same single vocab-parallel Function.

    Args:
        logits: [..., V_local]; target_ids: [...] global ids (sampled tokens).
        teacher_topk_ids: [..., K] global ids of the teacher's top-k at each position (distinct).
        teacher_topk_logprobs: [..., K] the teacher's log-probs at those ids (<= 0; ``-inf``: an
            absent entry, see :func:`topk_kl`).
        direction, tail: see :func:`topk_kl`. Other arguments: see :func:`gather_vocab_parallel_logprobs`.
    """
    expected = tuple(logits.shape[:-1])
    if tuple(target_ids.shape) != expected:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must have shape {expected}")
    if teacher_topk_ids.dim() != len(expected) + 1 or tuple(teacher_topk_ids.shape[:-1]) != expected:
        raise ValueError(f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} must be [..., K] with leading shape {expected}")
    if tuple(teacher_topk_logprobs.shape) != tuple(teacher_topk_ids.shape):
        raise ValueError(f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} must match teacher_topk_ids "
                         f"{tuple(teacher_topk_ids.shape)}")
    if teacher_topk_ids.shape[-1] < 1:
        raise ValueError("teacher_topk_ids must hold at least one id per position (K >= 1)")
    if bool((torch.isnan(teacher_topk_logprobs) | torch.isposinf(teacher_topk_logprobs)).any()):
        raise ValueError("teacher_topk_logprobs holds NaN/+inf values (-inf marks an absent entry)")
    if bool((teacher_topk_logprobs > 1e-4).any()):
        raise ValueError("teacher_topk_logprobs must be log-probabilities (<= 0)")
    ids = torch.cat([target_ids.unsqueeze(-1).long(), teacher_topk_ids.long()], dim=-1)  # [..., 1 + K]
    stats = gather_vocab_parallel_logprobs(
        logits, ids, vocab_size=vocab_size, temperature=temperature, tp_group=tp_group,
        return_entropy=return_entropy, chunk_tokens=chunk_tokens, check_finite=check_finite, fused=fused)
    target_logprobs = stats.logprobs[..., 0]
    kl = topk_kl(stats.logprobs[..., 1:], teacher_topk_logprobs, direction=direction, tail=tail)
    return TopkKLResult(target_logprobs, kl, stats.entropy)
