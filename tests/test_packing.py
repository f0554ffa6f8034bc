"""Packing and token-budget planning without a model: layout, round trips, budgets, balance, fillers."""

from __future__ import annotations

import random

import pytest
import torch

from scope_megatron.batch import PackedMicroBatch
from scope_megatron.packing import (build_packed_micro_batches, pack_sequences, pad_sequences, partition_balanced,
                                    plan_packed, unpack)


def _seqs(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 2:] = True
        out.append({"tokens": torch.randint(1, 100, (n,), generator=gen),
                    "targets": torch.randint(1, 100, (n,), generator=gen), "response_mask": mask,
                    "teacher_logprobs": -torch.rand(n, generator=gen), "rollout_logprobs": torch.full((n,), float(i + 1))})
    return out


def test_pack_layout_and_unpack_round_trip():
    seqs = _seqs([3, 5, 1, 2])
    mb = pack_sequences(seqs, trajectory_index=[7, 2, 9, 4])
    assert mb.tokens.shape == (1, 11)
    assert mb.cu_seqlens.tolist() == [0, 3, 8, 9, 11] and mb.cu_seqlens.dtype == torch.int32
    assert mb.cu_seqlens_padded is None and mb.max_seqlen == 5
    assert mb.tokens[0].tolist() == torch.cat([s["tokens"] for s in seqs]).tolist()
    assert mb.fields.token_trajectory[0].tolist() == [0] * 3 + [1] * 5 + [2] + [3] * 2
    assert mb.fields.trajectory_index.tolist() == [7, 2, 9, 4]
    assert mb.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1]
    assert mb.num_loss_tokens == sum(int(s["response_mask"].sum()) for s in seqs)
    for key in ("targets", "response_mask", "teacher_logprobs", "rollout_logprobs"):
        for piece, seq in zip(unpack(getattr(mb.fields, key), mb), seqs):
            assert torch.equal(piece, seq[key])
    # [T, ...] outputs (e.g. [1, T, V] logits) unpack too
    logits = torch.randn(1, 11, 6)
    assert [p.shape for p in unpack(logits, mb)] == [(3, 6), (5, 6), (1, 6), (2, 6)]
    assert torch.equal(unpack(logits, mb)[1], logits[0, 3:8])


def test_pack_padded_slots():
    seqs = _seqs([3, 5, 2])
    mb = pack_sequences(seqs, seq_multiple=4, total_multiple=24, pad_id=0)
    # slots 4, 8, 4 -> 16 tokens, then the row grows to 24 inside the last slot
    assert mb.cu_seqlens.tolist() == [0, 3, 8, 10]
    assert mb.cu_seqlens_padded.tolist() == [0, 4, 12, 24]
    assert mb.tokens.shape == (1, 24) and mb.max_seqlen == 12
    assert mb.tokens[0, 3].item() == 0 and mb.tokens[0, 12:14].tolist() == seqs[2]["tokens"].tolist()
    assert not mb.fields.response_mask[0, 3] and int(mb.fields.response_mask.sum()) == mb.num_loss_tokens
    for piece, seq in zip(unpack(mb.fields.targets, mb), seqs):
        assert torch.equal(piece, seq["targets"])
    params = mb.packed_seq_params()
    assert params.qkv_format == "thd" and params.max_seqlen_q == 12
    assert params.cu_seqlens_q.tolist() == [0, 3, 8, 10] and params.cu_seqlens_kv_padded.tolist() == [0, 4, 12, 24]


def test_block_causal_mask_matches_brute_force():
    mb = pack_sequences(_seqs([2, 3, 1]), seq_multiple=2)  # slots 2, 4, 2
    mask = mb.block_causal_mask()[0, 0]
    slot_of = [0, 0, 1, 1, 1, 1, 2, 2]
    for q in range(8):
        for k in range(8):
            assert bool(mask[q, k]) == (not (slot_of[q] == slot_of[k] and k <= q)), (q, k)


def test_packed_micro_batch_validates():
    with pytest.raises(ValueError, match="cu_seqlens"):
        PackedMicroBatch(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="rise strictly"):
        PackedMicroBatch(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        PackedMicroBatch(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([{"tokens": torch.zeros(0, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"must be \[3\] or \[3, \.\.\.\] \(one row per token\)"):
        pack_sequences([{"tokens": torch.zeros(3, dtype=torch.long), "response_mask": torch.zeros(2)}])
    with pytest.raises(ValueError, match="per-token shape"):  # [L, K] fields must agree on K
        pack_sequences([{"tokens": torch.zeros(3, dtype=torch.long), "teacher_topk_ids": torch.zeros(3, 4)},
                        {"tokens": torch.zeros(2, dtype=torch.long), "teacher_topk_ids": torch.zeros(2, 5)}])
    with pytest.raises(ValueError, match="not TokenFields per-token fields"):  # a misspelt field fails loudly
        pack_sequences([{"tokens": torch.zeros(3, dtype=torch.long), "mask": torch.zeros(3)}])
    moved = pack_sequences(_seqs([2, 3]), attention="mask").to("cpu")
    assert isinstance(moved, PackedMicroBatch) and moved.attention == "mask" and moved.cu_seqlens.tolist() == [0, 2, 5]


def test_pad_sequences_is_the_padded_layout():
    seqs = _seqs([3, 5])
    mb = pad_sequences(seqs, trajectory_index=[0, 1])
    assert mb.tokens.shape == (2, 5) and mb.fields.response_mask.shape == (2, 5)
    assert not mb.fields.response_mask[0, 3:].any()
    assert mb.num_loss_tokens == int(sum(s["response_mask"].sum() for s in seqs))


def test_karmarkar_karp_partition():
    # largest differencing on {8,7,6,5,4} in two: (8,7)->1, (6,5)->1, (4,1)->3, (3,1)->2: sums 16 / 14
    parts = partition_balanced([8, 7, 6, 5, 4], 2)
    assert sorted(sum([8, 7, 6, 5, 4][i] for i in p) for p in parts) == [14, 16]
    assert sorted(i for p in parts for i in p) == list(range(5))
    # long-tailed lengths: KK at least as even as greedy, and far better than round-robin
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(7, 1)) + 1 for _ in range(64)]
    for k in (2, 4, 8):
        spread = {}
        for method in ("karmarkar_karp", "greedy"):
            parts = partition_balanced(lengths, k, method)
            assert sorted(i for p in parts for i in p) == list(range(64))
            sums = [sum(lengths[i] for i in p) for p in parts]
            spread[method] = max(sums) - min(sums)
        rr = [sum(lengths[i] for i in range(r, 64, k)) for r in range(k)]
        for method, value in spread.items():  # neither method guarantees beating the other on every instance
            assert value <= max(lengths) and value < (max(rr) - min(rr)) / 4, (k, method, value)
    assert partition_balanced([5], 3) in ([[0], [], []], [[], [0], []], [[], [], [0]])
    assert partition_balanced([], 2) == [[], []]


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
@pytest.mark.parametrize("budget", [100, 700, 5000])
def test_plan_respects_budget_and_gives_equal_counts(dp, budget):
    rng = random.Random(dp * 1000 + budget)
    lengths = [min(int(rng.lognormvariate(5, 0.9)) + 1, 2000) for _ in range(40)]
    plan = plan_packed(lengths, max_tokens=budget, dp=dp)
    assert len(plan.per_rank) == dp
    assert len({len(rank) for rank in plan.per_rank}) == 1  # the same count on every rank
    flat = [i for rank in plan.per_rank for mb in rank for i in mb]
    assert sorted(flat) == list(range(40))  # every sequence exactly once
    assert plan.oversize == [i for i, n in enumerate(lengths) if n > budget]
    for rank in plan.per_rank:
        for mb in rank:
            tokens = sum(lengths[i] for i in mb)
            assert tokens <= budget or (len(mb) == 1 and mb[0] in plan.oversize)
    # not more micro-batches than first-fit needs on the busiest rank
    assert plan.num_micro_batches <= max(1, -(-sum(lengths) // budget) * 2 + len(plan.oversize))
    assert plan == plan_packed(lengths, max_tokens=budget, dp=dp)  # deterministic


def test_plan_spreads_tokens_evenly_over_micro_batches():
    plan = plan_packed([30, 30, 30, 30, 20, 20, 20, 20], max_tokens=100, dp=1)
    assert plan.num_micro_batches == 3
    assert sorted(plan.tokens([30, 30, 30, 30, 20, 20, 20, 20])[0]) == [60, 70, 70]


def test_oversize_policy():
    lengths = [10, 300, 20, 40]
    plan = plan_packed(lengths, max_tokens=64, dp=2)
    assert plan.oversize == [1]
    assert [1] in plan.per_rank[0] + plan.per_rank[1]  # alone in its micro-batch
    with pytest.raises(ValueError, match="exceed max_tokens_per_microbatch = 64"):
        plan_packed(lengths, max_tokens=64, dp=2, oversize="error")
    # seq_multiple rounds lengths up before the budget applies: 62 -> 64 fits, 63 -> 66 does not
    assert plan_packed([62], max_tokens=64, seq_multiple=4).oversize == []
    assert plan_packed([63], max_tokens=64, seq_multiple=6).oversize == [0]


def test_fillers_when_a_rank_has_no_sequences():
    seqs = _seqs([6, 4, 9])
    per_rank = [build_packed_micro_batches(seqs, max_tokens=64, dp=4, dp_rank=r) for r in range(4)]
    assert [len(mbs) for mbs in per_rank] == [1, 1, 1, 1]
    fillers = [mbs[0] for mbs in per_rank if mbs[0].num_loss_tokens == 0]
    assert len(fillers) == 1
    filler = fillers[0]
    assert not filler.fields.response_mask.any() and not filler.fields.rollout_logprobs.any()
    assert filler.fields.trajectory_index.tolist() == [1]  # the shortest sequence, loss-free
    assert torch.equal(filler.tokens[0], seqs[1]["tokens"]) and torch.equal(filler.fields.targets[0], seqs[1]["targets"])
    real = sorted(int(r) for mbs in per_rank for mb in mbs if mb.num_loss_tokens for r in mb.fields.trajectory_index)
    assert real == [0, 1, 2]


def test_packed_objective_loss_equals_padded():
    """The real SCOPE objective on packed [1, T] tensors (token_trajectory + rows) equals the padded [B, S] form."""
    from scope_megatron.objective import ObjectiveConfig, objective_loss
    from scope_megatron.objective.loss import GlobalDenominators, TrajectoryCoefficients

    seqs = _seqs([7, 3, 12, 1, 5], seed=4)
    n = len(seqs)
    gen = torch.Generator().manual_seed(1)
    coeffs = TrajectoryCoefficients(mle_weight=torch.rand(n, generator=gen), kl_weight=torch.rand(n, generator=gen),
                                    advantage=torch.zeros(n), on_mle_path=torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool),
                                    on_kl_path=torch.tensor([0, 1, 0, 1, 1], dtype=torch.bool))
    total = int(sum(s["response_mask"].sum() for s in seqs))
    denominators = GlobalDenominators(response_tokens=total, mle_tokens=total // 2, kl_tokens=total - 3, groups=2,
                                      trajectories=n)
    config = ObjectiveConfig()
    # the current log-probs travel as the rollout engine's field, lp_old is placed by hand below
    old_lp = []
    for s in seqs:
        s["rollout_logprobs"] = -torch.rand(s["tokens"].numel(), generator=gen) - 0.1
        old_lp.append(s["rollout_logprobs"] + 0.05 * torch.randn(s["tokens"].numel(), generator=gen))

    def run(mb, **kw):
        lp = mb.fields.rollout_logprobs.clone().requires_grad_(True)
        rows = mb.fields.trajectory_index
        lp_old = torch.zeros_like(lp)
        if isinstance(mb, PackedMicroBatch):  # no slot padding: the sequences one after another
            lp_old[0] = torch.cat([old_lp[i] for i in rows.tolist()])
        else:
            for b, i in enumerate(rows.tolist()):
                lp_old[b, :old_lp[i].numel()] = old_lp[i]
        sel = TrajectoryCoefficients(*(getattr(coeffs, f)[rows] for f in
                                       ("mle_weight", "kl_weight", "advantage", "on_mle_path", "on_kl_path")))
        out = objective_loss(config, sel, denominators, logprobs=lp, response_mask=mb.fields.response_mask,
                             old_logprobs=lp_old, teacher_logprobs=mb.fields.teacher_logprobs, **kw)
        out.loss.backward()
        return out.loss, lp.grad

    order = [3, 0, 4, 2, 1]  # packed in another order than the rows
    packed = pack_sequences([seqs[i] for i in order], trajectory_index=order)
    loss_p, grad_p = run(packed, token_trajectory=packed.fields.token_trajectory)
    padded = pad_sequences(seqs, trajectory_index=list(range(n)))
    loss_d, grad_d = run(padded)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-6, atol=0)
    for piece, i in zip(unpack(grad_p, packed), order):
        torch.testing.assert_close(piece, grad_d[i, :seqs[i]["tokens"].numel()], rtol=1e-6, atol=1e-9)
    # scrambling which trajectory a token belongs to changes the loss (so the check has teeth)
    wrong = packed.fields.token_trajectory.flip(-1)
    loss_w, _ = run(packed, token_trajectory=wrong)
    assert abs(loss_w.item() - loss_d.item()) > 1e-4


def test_context_parallel_split_layout():
    from scope_megatron.packing import shard_for_context_parallel

    seqs = _seqs([8, 3])
    mb = pack_sequences(seqs, trajectory_index=[0, 1], seq_multiple=4)  # slots 8 and 4 (the second padded by 1)
    parts = [shard_for_context_parallel(mb, 2, r) for r in range(2)]
    # 2 * cp = 4 chunks per slot; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    expected = [[0, 1, 6, 7, 8, 11], [2, 3, 4, 5, 9, 10]]
    for r, part in enumerate(parts):
        assert part.local_index().tolist() == expected[r]
        assert torch.equal(part.tokens[0], mb.tokens[0, expected[r]])
        for key in ("targets", "response_mask", "token_trajectory", "rollout_logprobs"):
            assert torch.equal(getattr(part.fields, key)[0], getattr(mb.fields, key)[0, expected[r]])
        assert torch.equal(part.fields.trajectory_index, mb.fields.trajectory_index)
        assert torch.equal(part.cu_seqlens, mb.cu_seqlens) and torch.equal(part.cu_seqlens_padded, mb.cu_seqlens_padded)
        assert part.position_ids[0].tolist() == [p - (0 if p < 8 else 8) for p in expected[r]]
    assert sum(p.num_loss_tokens for p in parts) == mb.num_loss_tokens
    with pytest.raises(ValueError, match="multiples of 2 \\* cp"):
        shard_for_context_parallel(pack_sequences(seqs), 2, 0)
    with pytest.raises(ValueError, match="gather context-parallel outputs first"):
        unpack(parts[0].fields.targets, parts[0])
    with pytest.raises(NotImplementedError):
        parts[0].block_causal_mask()
    # build_packed_micro_batches pads slots to 2 * cp by itself
    built = build_packed_micro_batches(seqs, max_tokens=64, cp_size=2, cp_rank=1)
    assert len(built) == 1 and built[0].cp_size == 2 and built[0].slot_lengths.tolist() == [8, 4]


def test_padded_plan_and_its_filler():
    """plan_padded by hand: lengths [5, 9, 2, 7, 3] dealt round-robin longest first over 2 ranks."""
    from scope_megatron.packing import build_micro_batches, plan_padded

    lengths = [5, 9, 2, 7, 3]
    plan = plan_padded(lengths, dp=2, micro_batch_size=2, length_multiple=2)
    # order by length: 1 (9), 3 (7), 0 (5), 4 (3), 2 (2) -> rank 0: 1, 0, 2; rank 1: 3, 4
    assert plan.per_rank == [[[0, 1], [2]], [[3, 4]]] and plan.num_micro_batches == 2
    assert plan.padded_positions == 2 * 10 + 1 * 2 + 2 * 8  # widths rounded up to a multiple of 2
    assert plan.filler == 2  # the shortest, as for packed plans
    seqs = _seqs(lengths)
    mbs = build_micro_batches(plan, seqs, dp_rank=0, total_multiple=2)
    assert [mb.tokens.shape for mb in mbs] == [(2, 10), (1, 2)]
    assert mbs[0].fields.trajectory_index.tolist() == [0, 1]
    # more ranks than sequences: a rank without any gets one loss-free micro-batch of the filler
    few = plan_padded([4, 3], dp=3, micro_batch_size=2)
    assert few.per_rank[2] == [[]]
    (filler,) = build_micro_batches(few, _seqs([4, 3]), dp_rank=2)
    assert filler.fields.trajectory_index.tolist() == [1] and filler.num_loss_tokens == 0
    assert not filler.fields.response_mask.any() and not filler.fields.teacher_logprobs.any()
    assert torch.equal(filler.fields.targets[0], _seqs([4, 3])[1]["targets"])
