"""The rollout batch as flat tensors: every rank rebuilds exactly rank 0's batch, and batching
turns the rebuilt batch into the same micro-batches as the original lists."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from scope_megatron.rollout.batch_transport import TensorListView, rollout_batch_nbytes
from scope_megatron.rollout.types import RolloutBatch, Trajectory
from tests.dist_utils import run_ranks

pytestmark = pytest.mark.timeout(180)
TOPK = 3
LIST_FIELDS = ("prompt_ids", "response_ids", "rollout_logprobs", "teacher_logprobs", "teacher_topk_ids",
               "teacher_topk_logprobs")


def _float32_values(gen: torch.Generator, n: int) -> list[float]:
    """Log-probs as an engine sends them: float32 values (<= 0) as Python floats."""
    return (-torch.rand(n, generator=gen) * 8).float().tolist()


def make_batch(step: int = 7, topk: int = TOPK) -> RolloutBatch:
    """Variable prompt and response lengths (an empty response, a one-token one), trajectories
    with and without rollout log-probs, ``-inf`` in the top-k log-probs (a masked entry), unicode
    strings and a missing weight version; two groups of three samples."""
    gen = torch.Generator().manual_seed(step)
    response_lengths = [5, 0, 1, 17, 9, 3]
    statuses = ["correct", "wrong", "format_error: réponse ∅", "correct", "wrong", "timeout ⏱"]
    finishes = ["stop", "abort", "length", "stop", "length", "stop"]
    trajectories = []
    for i, r in enumerate(response_lengths):
        group = i // 3
        prompt = torch.randint(0, 50_000, (4 + 3 * group,), generator=gen).tolist()
        response = torch.randint(0, 150_000, (r,), generator=gen).tolist()
        ids = [torch.randperm(150_000, generator=gen)[:topk].tolist() for _ in range(r)] if topk else []
        top = [_float32_values(gen, topk) for _ in range(r)] if topk else []
        if r > 2 and topk:
            top[1][topk - 1] = float("-inf")
        trajectories.append(Trajectory(
            group=group, prompt_index=1000 + group, sample=i % 3, prompt_ids=prompt, response_ids=response,
            rollout_logprobs=_float32_values(gen, r) if i % 2 == 0 else [], teacher_logprobs=_float32_values(gen, r),
            reward=[1.0, 0.0, -0.25, 1.0, 0.0, 0.5][i], reward_status=statuses[i], finish=finishes[i],
            weight_version=None if i == 4 else f"step-{step} ✓", teacher_topk_ids=ids, teacher_topk_logprobs=top))
    return RolloutBatch(step=step, trajectories=trajectories, timings={"time/generate": 1.5, "topk/masked": 2.0})


def assert_same_batch(got: RolloutBatch, want: RolloutBatch) -> None:
    """Field by field equality, lists compared as Python lists (exact values, -inf included)."""
    assert got.step == want.step and got.timings == want.timings
    assert len(got.trajectories) == len(want.trajectories)
    for g, w in zip(got.trajectories, want.trajectories):
        for name in ("group", "prompt_index", "sample", "reward", "reward_status", "finish", "weight_version"):
            assert getattr(g, name) == getattr(w, name), name
            assert type(getattr(g, name)) is type(getattr(w, name)), name
        for name in LIST_FIELDS:
            assert list(getattr(g, name)) == getattr(w, name), name
            assert getattr(g, name) == getattr(w, name), name  # the view's own ==
            assert len(getattr(g, name)) == len(getattr(w, name)), name


def _step_tensors(trajectories, topk: int, packed: bool) -> list[dict[str, torch.Tensor]]:
    from scope_megatron.trainer.batching import build_step_data

    data = build_step_data(trajectories, dp=2, dp_rank=1, micro_batch_size=2, pad_id=0,
                           max_tokens_per_microbatch=64 if packed else None, teacher_topk=topk)
    out = [{"tokens": mb.tokens, **dict(mb.fields.items())} for mb in data.micro_batches]
    out.append({"group_ids": data.group_ids, "lengths": data.response_lengths, "correct": data.correct,
                "rewards": data.rewards, "teacher_mean": data.teacher_logprob_mean})
    return out


def _worker(rank: int, world_size: int):
    import torch.distributed as dist

    from scope_megatron.rollout.batch_transport import RolloutMessage, broadcast_rollout_batch, \
        broadcast_rollout_message, tensor_backed

    group = dist.new_group(backend="gloo")
    report = {}
    # a batch with top-k, from rank 0
    original = make_batch()
    mine = original if rank == 0 else None
    got = broadcast_rollout_batch(mine, src=0, group=group)
    if rank == 0:
        report["source_keeps_its_object"] = got is original
    else:
        assert isinstance(got.trajectories[0].response_ids, TensorListView)
    assert_same_batch(got, original)
    # batching of the rebuilt batch equals batching of the lists (padded and packed, with top-k)
    for packed in (False, True):
        ours, theirs = _step_tensors(got.trajectories, TOPK, packed), _step_tensors(original.trajectories, TOPK, packed)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # a batch whose source already holds tensor-backed trajectories (tensor_backed)
    backed = RolloutBatch(original.step, [tensor_backed(t) for t in original.trajectories], original.timings)
    assert_same_batch(backed, original)
    assert_same_batch(broadcast_rollout_batch(backed if rank == 0 else None, src=0, group=group), original)
    # a batch without top-k, from the last rank, through the message form
    plain = make_batch(step=9, topk=0)
    src = world_size - 1
    msg = broadcast_rollout_message(RolloutMessage.ok(plain) if rank == src else None, src=src, group=group)
    assert msg.status == "ok" and msg.message == ""
    assert_same_batch(msg.batch, plain)
    # no trajectory at all
    empty = RolloutBatch(step=3, trajectories=[], timings={})
    assert_same_batch(broadcast_rollout_batch(empty if rank == 0 else None, src=0, group=group), empty)
    # the envelopes
    stop = broadcast_rollout_message(RolloutMessage.stop() if rank == 0 else None, src=0, group=group)
    report["stop"] = (stop.status, stop.batch, stop.message)
    text = "engine http://h:1 failed: déjà vu ✗"
    err = broadcast_rollout_message(RolloutMessage.error(text) if rank == 0 else None, src=0, group=group)
    report["error"] = (err.status, err.batch, err.message)
    # a batch that cannot travel (ragged top-k rows) is an error on every rank, none left waiting
    ragged = make_batch(step=11)
    ragged.trajectories[3].teacher_topk_ids[2] = [1, 2]
    bad = broadcast_rollout_message(RolloutMessage.ok(ragged) if rank == 0 else None, src=0, group=group)
    report["ragged"] = (bad.status, bad.message)
    # the traffic is the raw bytes (the per-trajectory views hold no copy of their own)
    report["buffers_shared"] = rank == 0 or all(
        t.response_ids.tensor.untyped_storage().data_ptr() == got.trajectories[0].prompt_ids.tensor.untyped_storage().data_ptr()
        for t in got.trajectories)
    return report


def test_every_rank_rebuilds_the_batch():
    reports = run_ranks(_worker, world_size=3, timeout=150)
    assert reports[0]["source_keeps_its_object"]
    for rank, report in enumerate(reports):
        assert report["stop"] == ("stop", None, ""), rank
        assert report["error"] == ("error", None, "engine http://h:1 failed: déjà vu ✗"), rank
        status, message = report["ragged"]
        assert status == "error" and "prompt 1001, sample 0" in message and "teacher_topk_ids" in message, rank
        assert report["buffers_shared"], rank


def test_tensor_list_view_behaves_like_its_list():
    values = [3, -1, 7, 2**31 - 1, 0]
    view = TensorListView(torch.tensor(values, dtype=torch.int32))
    assert len(view) == 5 and view and not TensorListView(torch.empty(0, dtype=torch.int32))
    assert view == values and values == view and view != values[:-1] and list(view) == values
    assert view[1] == -1 and type(view[1]) is int and view[-1] == 0
    assert view[1:3] == values[1:3] and isinstance(view[1:3], TensorListView)
    assert view + [9] == values + [9] and [9] + view == [9] + values and view + view == values + values
    assert 7 in view and 8 not in view
    assert torch.equal(torch.tensor(view, dtype=torch.long), torch.tensor(values, dtype=torch.long))
    rows = [[1.5, float("-inf")], [-0.25, -3.0]]
    grid = TensorListView(torch.tensor(rows, dtype=torch.float32))
    assert grid == rows and grid[1] == rows[1] and list(grid) == rows and len(grid) == 2
    assert math.isinf(grid[0][1]) and grid[0][1] < 0
    assert sum(TensorListView(torch.tensor([0.5, 0.25], dtype=torch.float32))) == 0.75
    # copies and pickles carry the slice only, not the whole buffer behind it
    buffer = torch.arange(1_000_000, dtype=torch.int32)
    piece = TensorListView(buffer[10:20])
    assert len(pickle.dumps(piece)) < 2_000 and pickle.loads(pickle.dumps(piece)) == list(range(10, 20))
    deep = copy.deepcopy(piece)
    assert deep == piece and deep.tensor.untyped_storage().nbytes() == 40


def test_batch_nbytes_counts_the_tensors_and_refuses_ragged_rows():
    batch = make_batch()
    trajs = batch.trajectories
    ids = sum(len(t.prompt_ids) + len(t.response_ids) + TOPK * len(t.teacher_topk_ids) for t in trajs)
    lps = sum(len(t.rollout_logprobs) + len(t.teacher_logprobs) + TOPK * len(t.teacher_topk_logprobs) for t in trajs)
    assert rollout_batch_nbytes(batch) == len(trajs) * 10 * 8 + 4 * (ids + lps)
    trajs[0].teacher_topk_logprobs[1] = [0.0]
    with pytest.raises(ValueError, match="prompt 1000, sample 0.*teacher_topk_logprobs rows of different lengths"):
        rollout_batch_nbytes(batch)
