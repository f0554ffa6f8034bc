"""Vocab-parallel log-probs, entropy and top-k KL against a single-process full-vocabulary
plain-torch reference, at TP = 1 (in process) and TP = 2, 4 (gloo processes), fp32 and bf16,
with padded vocabulary columns (250 real of 256)."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch
import torch.distributed as dist

from scope_megatron.objective import (
    gather_vocab_parallel_logprobs,
    resolve_tp_group,
    topk_kl,
    vocab_parallel_logprobs,
    vocab_parallel_topk_kl,
)
from tests.dist_utils import run_ranks

VOCAB = 250  # true vocabulary
PADDED = 256  # padded vocabulary (divisible by 1, 2, 4)
TOKENS = (3, 8)  # leading shape [b, s]
TOPK = 5
TEMPERATURE = 0.7
# (direction, tail) variants of the top-k KL
TOPK_KINDS = [("forward", False), ("reverse", False), ("forward", True), ("reverse", True)]


def make_case(seed: int = 0) -> dict[str, torch.Tensor]:
    """Logits [3, 8, 256] (padding columns hold large values that must be ignored), ids, a
    teacher's top-k and the random upstream coefficients of the test loss."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(*TOKENS, PADDED, generator=g)
    logits[..., VOCAB:] = 50.0  # would dominate the softmax if not excluded
    targets = torch.randint(0, VOCAB, TOKENS, generator=g)
    teacher_logits = 2.0 * torch.randn(*TOKENS, VOCAB, generator=g)
    teacher_lp = torch.log_softmax(teacher_logits, dim=-1)
    top_lp, top_ids = teacher_lp.topk(TOPK, dim=-1)
    targets[0, :4] = top_ids[0, :4, 1]  # sampled token inside the teacher's top-k: a duplicated id
    targets[1, :2] = 249  # the last real id, next to the padding
    return {
        "logits": logits,
        "targets": targets,
        "topk_ids": top_ids,
        "topk_lp": top_lp,
        "a": torch.randn(TOKENS, generator=g),  # d loss / d log p(target)
        "c": torch.randn(TOKENS, generator=g),  # d loss / d entropy
        "w": torch.rand(TOKENS, generator=g),  # d loss / d kl
    }


def reference_kl(lp: torch.Tensor, lq: torch.Tensor, direction: str, tail: bool) -> torch.Tensor:
    """Top-k KL written out independently of the library (lp: student log p at the ids)."""
    if not tail:
        q = torch.softmax(lq, -1)
        if direction == "forward":
            return (q * (torch.log(q) - lp)).sum(-1)
        p = torch.softmax(lp, -1)
        return (p * (torch.log(p) - torch.log(q))).sum(-1)
    p_k, q_k = lp.exp(), lq.exp()
    p_rest = (1 - p_k.sum(-1)).clamp(min=1e-6)
    q_rest = (1 - q_k.sum(-1)).clamp(min=1e-6)
    if direction == "forward":
        return (q_k * (lq - lp)).sum(-1) + q_rest * (q_rest.log() - p_rest.log())
    return (p_k * (lp - lq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


def reference(case: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Full-vocabulary single-process reference: values, and d(loss)/d(logits) for each variant.

    The logits are first rounded to ``dtype`` (what the Function sees), then handled in fp64.
    """
    out: dict = {}
    base = case["logits"].to(dtype).double()
    for kind in [None] + TOPK_KINDS:
        x = base.clone().requires_grad_(True)
        logp = torch.log_softmax(x[..., :VOCAB] / TEMPERATURE, dim=-1)  # padded columns excluded
        lp_target = logp.gather(-1, case["targets"].unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        loss = (case["a"] * lp_target).sum() + (case["c"] * entropy).sum()
        result = {"lp": lp_target.detach(), "entropy": entropy.detach()}
        if kind is not None:
            kl = reference_kl(logp.gather(-1, case["topk_ids"]), case["topk_lp"].double(), *kind)
            loss = loss + (case["w"] * kl).sum()
            result["kl"] = kl.detach()
        loss.backward()
        result["grad"] = x.grad
        out[kind] = result
    return out


def compute(case: dict[str, torch.Tensor], dtype: torch.dtype, rank: int, world: int, group, chunk_tokens: int,
            fused: bool = False) -> dict:
    """The library on this rank's vocabulary slice; returns values and this slice's gradient."""
    out: dict = {}
    shard = PADDED // world
    for kind in [None] + TOPK_KINDS:
        x = case["logits"][..., rank * shard:(rank + 1) * shard].to(dtype).clone().requires_grad_(True)
        if kind is None:
            lp, entropy = vocab_parallel_logprobs(x, case["targets"], vocab_size=VOCAB, temperature=TEMPERATURE,
                                                  tp_group=group, return_entropy=True, chunk_tokens=chunk_tokens,
                                                  fused=fused)
            loss = (case["a"] * lp).sum() + (case["c"] * entropy).sum()
            result = {"lp": lp.detach(), "entropy": entropy.detach()}
        else:
            res = vocab_parallel_topk_kl(x, case["targets"], case["topk_ids"], case["topk_lp"], vocab_size=VOCAB,
                                         direction=kind[0], tail=kind[1], temperature=TEMPERATURE, tp_group=group,
                                         return_entropy=True, chunk_tokens=chunk_tokens, fused=fused)
            loss = (case["a"] * res.target_logprobs).sum() + (case["c"] * res.entropy).sum() + (case["w"] * res.topk_kl).sum()
            result = {"lp": res.target_logprobs.detach(), "entropy": res.entropy.detach(), "kl": res.topk_kl.detach()}
        loss.backward()
        assert x.grad.dtype == dtype
        result["grad"] = x.grad
        out[kind] = result
    return out


def to_bytes(obj) -> bytes:
    """Results travel serialised: an older run_ranks sent tensors as shared-memory handles that
    died with the worker process (ConnectionResetError); bytes work with either version."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _tp_worker(rank: int, world: int, dtypes: list[torch.dtype]) -> bytes:
    case = make_case()
    group = dist.new_group(list(range(world)))  # an explicit group, not just the default one
    return to_bytes({dtype: compute(case, dtype, rank, world, group, chunk_tokens=5) for dtype in dtypes})


TOL = {torch.float32: dict(value=2e-5, grad_rtol=1e-4, grad_atol=1e-6),
       torch.bfloat16: dict(value=2e-5, grad_rtol=2 ** -7, grad_atol=1e-5)}


def check_against_reference(per_rank: list[dict], dtype: torch.dtype) -> None:
    case = make_case()
    ref = reference(case, dtype)
    tol = TOL[dtype]
    for kind, expected in ref.items():
        for key in ("lp", "entropy", "kl"):
            if key not in expected:
                continue
            for rank_result in per_rank:  # every TP rank holds the full per-token values
                got = rank_result[kind][key].double()
                torch.testing.assert_close(got, expected[key], rtol=0, atol=tol["value"], msg=f"{kind} {key}")
        grad = torch.cat([r[kind]["grad"] for r in per_rank], dim=-1)
        assert bool((grad[..., VOCAB:] == 0).all()), "padded vocabulary columns must get zero gradient"
        # the Function's fp32 gradient, rounded once to the logits' dtype
        torch.testing.assert_close(grad.double(), expected["grad"].to(dtype).double(), rtol=tol["grad_rtol"],
                                   atol=tol["grad_atol"], msg=f"{kind} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
def test_tp1_matches_full_vocab_reference(dtype, chunk_tokens):
    case = make_case()
    check_against_reference([compute(case, dtype, 0, 1, None, chunk_tokens)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_math_matches_reference(monkeypatch, dtype):
    """The un-fused bodies of the kernels torch.compile fuses on CUDA (compiling them here would take
    a minute of CPU; torch.compile's own correctness is torch's business)."""
    from scope_megatron.objective import logprobs as module

    monkeypatch.setattr(module, "_COMPILED", {"stats": module._stats_chunk_pure, "grad": module._grad_chunk_pure})
    monkeypatch.setattr(module, "_COMPILE_FAILED", False)
    check_against_reference([compute(make_case(), dtype, 0, 1, None, chunk_tokens=5, fused=True)], dtype)


@pytest.fixture(scope="module")
def tp_results() -> dict[int, list[dict]]:
    dtypes = [torch.float32, torch.bfloat16]
    return {world: [from_bytes(r) for r in run_ranks(_tp_worker, world, args=(dtypes,), timeout=120)] for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp_matches_full_vocab_reference(tp_results, world, dtype):
    check_against_reference([r[dtype] for r in tp_results[world]], dtype)


def test_fp64_gradcheck_with_padding_and_temperature():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 13, (2, 3, 4), generator=g)
    fn = lambda t: tuple(gather_vocab_parallel_logprobs(t, ids, vocab_size=13, temperature=1.7, return_entropy=True,
                                                         chunk_tokens=2))
    assert torch.autograd.gradcheck(fn, (x,))


def test_logits_are_not_modified_and_no_fp32_copy_is_saved():
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    before = x.detach().clone()
    ids = torch.randint(0, 60, (8,))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, entropy = vocab_parallel_logprobs(x, ids, vocab_size=60, return_entropy=True, chunk_tokens=3)
    (lp.sum() + entropy.sum()).backward()
    assert torch.equal(x.detach(), before)
    assert lp.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big, "the logits must be saved for the backward recompute"
    # the only [tokens, vocab]-sized tensor kept for backward is the input itself, in bf16
    assert all(t.dtype == torch.bfloat16 and t.data_ptr() == x.data_ptr() for t in big)


def test_topk_kl_tail_is_exact_coarse_grained_kl_and_full_support_is_full_kl():
    g = torch.Generator().manual_seed(2)
    p = torch.log_softmax(torch.randn(6, 20, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(2 * torch.randn(6, 20, generator=g, dtype=torch.float64), -1)
    ids = q.topk(4, -1).indices
    lp_k, lq_k = p.gather(-1, ids), q.gather(-1, ids)
    # coarse-grain both distributions to [the 4 ids, everything else], then the exact KL
    cp = torch.cat([lp_k.exp(), 1 - lp_k.exp().sum(-1, keepdim=True)], -1)
    cq = torch.cat([lq_k.exp(), 1 - lq_k.exp().sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(topk_kl(lp_k, lq_k, direction="forward", tail=True), (cq * (cq / cp).log()).sum(-1))
    torch.testing.assert_close(topk_kl(lp_k, lq_k, direction="reverse", tail=True), (cp * (cp / cq).log()).sum(-1))
    # with the full support, the top-k KL is the full KL in both directions
    full_fwd = (q.exp() * (q - p)).sum(-1)
    full_rev = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(topk_kl(p, q, direction="forward"), full_fwd)
    torch.testing.assert_close(topk_kl(p, q, direction="reverse"), full_rev)
    # the coarse-grained KL is a lower bound (data processing inequality), and all are >= 0
    assert bool((topk_kl(lp_k, lq_k, direction="forward", tail=True) <= full_fwd + 1e-12).all())
    for direction in ("forward", "reverse"):
        for tail in (False, True):
            assert bool((topk_kl(lp_k, lq_k, direction=direction, tail=tail) >= -1e-12).all())


def test_resolve_tp_group_uses_megatron_only_when_initialised(monkeypatch):
    sentinel = object()
    fake = types.SimpleNamespace(model_parallel_is_initialized=lambda: False,
                                 get_tensor_model_parallel_group=lambda: sentinel)
    monkeypatch.setitem(sys.modules, "megatron.core.parallel_state", fake)
    assert resolve_tp_group(None) is None
    fake.model_parallel_is_initialized = lambda: True
    assert resolve_tp_group(None) is sentinel
    explicit = object()
    assert resolve_tp_group(explicit) is explicit  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "megatron.core.parallel_state")
    assert resolve_tp_group(None) is None


def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 3, 16)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="target_ids"):
        vocab_parallel_logprobs(x, torch.zeros(2, 4, dtype=torch.long), vocab_size=16)
    with pytest.raises(TypeError, match="ids"):
        vocab_parallel_logprobs(x, ids.float(), vocab_size=16)
    with pytest.raises(ValueError, match="ids must be global token ids"):
        vocab_parallel_logprobs(x, ids - 100, vocab_size=16)
    with pytest.raises(ValueError, match="ids must be global token ids"):
        vocab_parallel_logprobs(x, ids + 14, vocab_size=14)  # a padded column is not a token
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs(x, ids, vocab_size=17)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(x, ids, vocab_size=16, temperature=0.0)
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vocab_parallel_logprobs(bad, ids, vocab_size=16)
    top_ids = torch.zeros(2, 3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        vocab_parallel_topk_kl(x, ids, top_ids, torch.full((2, 3, 2), float("nan")), vocab_size=16)
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        vocab_parallel_topk_kl(x, ids, top_ids, torch.zeros(2, 3, 3), vocab_size=16)
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        vocab_parallel_topk_kl(x, ids, top_ids[0], torch.zeros(3, 2), vocab_size=16)
