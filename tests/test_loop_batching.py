"""The loop's micro-batch layouts (trainer/batching.py): padded and packed hold the same tokens.

Reference: each trajectory's per-token tensors built by hand from its prompt / response /
log-prob lists (the documented token layout); both layouts, on every DP and CP rank, must put
exactly those values at exactly those positions, every trajectory exactly once.
"""

from __future__ import annotations

import random

import pytest
import torch

from scope_megatron.packing import unpack
from scope_megatron.rollout.types import Trajectory
from scope_megatron.trainer.batching import build_step_data


K = 3  # the teacher's top-k per response token
PER_TOKEN = ("targets", "response_mask", "teacher_logprobs", "rollout_logprobs", "teacher_topk_ids",
             "teacher_topk_logprobs")


def _trajectories(n: int = 11, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(1, 9), rng.choice([1, 2, 5, 17, 40])
        out.append(Trajectory(group=i // 4, prompt_index=i // 4, sample=i % 4,
                              prompt_ids=[rng.randint(1, 99) for _ in range(p)],
                              response_ids=[rng.randint(1, 99) for _ in range(r)],
                              rollout_logprobs=[-rng.random() for _ in range(r)],
                              teacher_logprobs=[-rng.random() - 1 for _ in range(r)],
                              reward=float(i % 3 == 0), reward_status="correct", finish="stop",
                              teacher_topk_ids=[rng.sample(range(1, 99), K) for _ in range(r)],
                              teacher_topk_logprobs=[[-rng.random() - 2 for _ in range(K)] for _ in range(r)]))
    return out


def _expected(t: Trajectory) -> dict[str, torch.Tensor]:
    """By hand: tokens = seq[:-1], targets = seq[1:], response j at position P - 1 + j."""
    seq = t.prompt_ids + t.response_ids
    n, start, r = len(seq) - 1, len(t.prompt_ids) - 1, len(t.response_ids)
    mask = torch.tensor([start <= i < start + r for i in range(n)])
    teacher = torch.zeros(n)
    rollout = torch.zeros(n)
    teacher[start:start + r] = torch.tensor(t.teacher_logprobs)
    rollout[start:start + r] = torch.tensor(t.rollout_logprobs)
    topk_ids, topk_lp = torch.zeros(n, K), torch.zeros(n, K)
    topk_ids[start:start + r] = torch.tensor(t.teacher_topk_ids, dtype=torch.float32)
    topk_lp[start:start + r] = torch.tensor(t.teacher_topk_logprobs)
    return {"tokens": torch.tensor(seq[:-1]), "targets": torch.tensor(seq[1:]), "response_mask": mask,
            "teacher_logprobs": teacher, "rollout_logprobs": rollout, "teacher_topk_ids": topk_ids,
            "teacher_topk_logprobs": topk_lp}


def _seen_padded(data) -> dict[int, dict[str, torch.Tensor]]:
    seen = {}
    for mb in data.micro_batches:
        for i, row in enumerate(mb.fields.trajectory_index.tolist()):
            if not mb.fields.response_mask[i].any():
                continue  # the zero-weight micro-batch of a rank without trajectories
            n = int(mb.fields.response_mask[i].nonzero().max()) + 1  # real tokens end with the last response token
            assert row not in seen
            seen[row] = {"tokens": mb.tokens[i, :n], **{k: getattr(mb.fields, k)[i, :n] for k in PER_TOKEN}}
    return seen


@pytest.mark.parametrize("dp", [1, 3])
def test_padded_layout_holds_every_trajectory_once(dp):
    trajs = _trajectories()
    seen = {}
    for rank in range(dp):
        data = build_step_data(trajs, dp=dp, dp_rank=rank, micro_batch_size=2, pad_id=0, teacher_topk=K)
        assert all(mb.tokens.shape[0] <= 2 for mb in data.micro_batches)
        seen.update(_seen_padded(data))
    assert sorted(seen) == list(range(len(trajs)))
    for row, got in seen.items():
        for key, value in _expected(trajs[row]).items():
            assert torch.equal(got[key], value.to(got[key].dtype)), (row, key)
    assert 0 < data.padding_fraction < 1


@pytest.mark.parametrize("dp, cp, budget", [(1, 1, 4096), (2, 1, 30), (3, 1, 8), (2, 2, 30), (1, 4, 64)])
def test_packed_layout_holds_every_trajectory_once(dp, cp, budget):
    """Packed rows, cut per CP rank and gathered back, unpack to each trajectory's hand-built tensors."""
    trajs = _trajectories()
    per_rank = {(d, c): build_step_data(trajs, dp=dp, dp_rank=d, micro_batch_size=2, pad_id=0,
                                        max_tokens_per_microbatch=budget, cp_size=cp, cp_rank=c, teacher_topk=K)
                for d in range(dp) for c in range(cp)}
    counts = {len(data.micro_batches) for data in per_rank.values()}
    assert counts == {per_rank[0, 0].num_micro_batches}  # the same count on every rank
    seen = {}
    for d in range(dp):
        for m in range(per_rank[d, 0].num_micro_batches):
            shards = [per_rank[d, c].micro_batches[m] for c in range(cp)]
            assert all(s.cp_size == cp and s.cp_rank == c for c, s in enumerate(shards))
            assert sum(s.num_loss_tokens for s in shards) == sum(int(s.fields.response_mask.sum()) for s in shards)
            whole = shards[0]
            values = {}
            for key in (*PER_TOKEN, "token_trajectory"):
                if cp == 1:
                    values[key] = getattr(whole.fields, key)[0]
                else:  # what gather_from_context_parallel does over a CP group, done by hand
                    local = getattr(whole.fields, key)[0]
                    full = torch.empty((int(whole.slot_bounds[-1]), *local.shape[1:]), dtype=local.dtype)
                    for c, s in enumerate(shards):
                        full[s.local_index()] = getattr(s.fields, key)[0]
                    values[key] = full
            tokens = torch.empty(int(whole.slot_bounds[-1]), dtype=torch.long)
            for s in shards:
                tokens[s.local_index()] = s.tokens[0]
            if not values["response_mask"].any():
                assert all(s.num_loss_tokens == 0 for s in shards)
                continue  # a filler
            # token_trajectory indexes the micro-batch's rows, which are global trajectory indices
            rows = whole.fields.trajectory_index.tolist()
            owner = whole.fields.trajectory_index[values["token_trajectory"]]
            for i, (row, toks) in enumerate(zip(rows, unpack(tokens, whole))):
                assert row not in seen
                got = {"tokens": toks, **{k: unpack(values[k], whole)[i] for k in PER_TOKEN}}
                seen[row] = got
                start = int(whole.slot_bounds[i])
                assert bool((owner[start:start + toks.numel()] == row).all())
    assert sorted(seen) == list(range(len(trajs)))
    for row, got in seen.items():
        for key, value in _expected(trajs[row]).items():
            assert torch.equal(got[key], value.to(got[key].dtype)), (row, key)
    if cp == 1:
        assert per_rank[0, 0].padding_fraction == 0.0  # packing without CP pads nothing
    else:  # slots are padded to multiples of 2 * cp only
        assert 0 < per_rank[0, 0].padding_fraction < 2 * cp * len(trajs) / sum(
            len(t.prompt_ids) + len(t.response_ids) - 1 for t in trajs)


def test_packed_layout_with_fewer_trajectories_than_ranks():
    trajs = _trajectories(n=1)
    datas = [build_step_data(trajs, dp=3, dp_rank=r, micro_batch_size=2, pad_id=0, max_tokens_per_microbatch=64)
             for r in range(3)]
    assert [len(d.micro_batches) for d in datas] == [1, 1, 1]
    assert sorted(d.micro_batches[0].num_loss_tokens for d in datas) == [0, 0, len(trajs[0].response_ids)]


def test_oversize_policy_and_context_parallel_needs_packing():
    trajs = _trajectories()
    longest = max(len(t.prompt_ids) + len(t.response_ids) - 1 for t in trajs)
    with pytest.raises(ValueError, match="exceed max_tokens_per_microbatch"):
        build_step_data(trajs, dp=1, dp_rank=0, micro_batch_size=2, pad_id=0, max_tokens_per_microbatch=longest - 1,
                        oversize="error")
    data = build_step_data(trajs, dp=1, dp_rank=0, micro_batch_size=2, pad_id=0, max_tokens_per_microbatch=longest - 1)
    assert max(mb.tokens.shape[1] for mb in data.micro_batches) == longest  # alone, over the budget
    with pytest.raises(ValueError, match="context parallelism needs packed"):
        build_step_data(trajs, dp=1, dp_rank=0, micro_batch_size=2, pad_id=0, cp_size=2)



def test_a_rank_builds_tensors_only_for_its_own_trajectories(monkeypatch):
    """Every rank sees the global batch, but builds per-token tensors only for what it packs."""
    from scope_megatron.trainer import batching

    built: list[int] = []
    real = batching._sequence

    def counting(t, topk=0):
        built.append(t.sample + 4 * t.group)
        return real(t, topk)

    monkeypatch.setattr(batching, "_sequence", counting)
    trajs = _trajectories(n=12)
    for rank in range(4):
        built.clear()
        data = build_step_data(trajs, dp=4, dp_rank=rank, micro_batch_size=2, pad_id=0, max_tokens_per_microbatch=48)
        mine = sorted(r for mb in data.micro_batches if mb.num_loss_tokens for r in mb.fields.trajectory_index.tolist())
        assert sorted(built) == mine and 0 < len(mine) < len(trajs)
