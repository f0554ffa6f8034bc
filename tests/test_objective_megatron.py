"""The objective's megatron adapters (objective/megatron.py) on 2 gloo ranks (DP = 2), fp32 CPU.

References: ``old_logprobs``' per-trajectory means against a plain torch computation (the same
model run on each trajectory alone, log_softmax, mean over the response tokens); the loss and
gradient norm of ``make_loss_fn`` must not depend on the layout (padded, packed by several
budgets), and lp_old recomputed at the current weights must give the same loss and gradient as
no lp_old at all (rho = 1 in value), which fails when lp_old is looked up for the wrong micro-batch
or laid out at the wrong tokens. The same with the forward pass on its own, larger token budget
(fewer rows, mapped back onto the training rows), and with context parallelism (CP = 2).
"""

from __future__ import annotations

import random

import pytest
import torch

from scope_megatron.rollout.types import Trajectory
from tests.dist_utils import run_ranks

# (training budget, forward budget): None: padded (micro_batch_size 2); else packed by that budget
LAYOUTS = [(None, None), (24, None), (64, None), (4096, None), (24, 4096), (24, 48)]


def _trajectories(vocab: int, n: int = 9, seed: int = 3) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, r = rng.randint(1, 7), rng.choice([1, 3, 9, 20])
        out.append(Trajectory(group=i // 3, prompt_index=i // 3, sample=i % 3,
                              prompt_ids=[rng.randint(1, vocab - 1) for _ in range(p)],
                              response_ids=[rng.randint(1, vocab - 1) for _ in range(r)],
                              rollout_logprobs=[-rng.random() for _ in range(r)],
                              teacher_logprobs=[-rng.random() - 1 for _ in range(r)],
                              reward=float(i % 2 == 0), reward_status="correct", finish="stop"))
    return out


def _worker(rank: int, world: int) -> dict:
    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model.arch import arch_from_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.objective import ObjectiveConfig, plan_batch
    from scope_megatron.objective.megatron import make_loss_fn, old_logprobs
    from scope_megatron.parallel import init_parallel
    from scope_megatron.examples.tiny_models import tiny_hf_config
    from scope_megatron.trainer.batching import build_step_data

    init_parallel(1, 1)  # DP = 2
    torch.manual_seed(0)
    arch = arch_from_hf_config(tiny_hf_config("qwen3").to_dict())
    model = build_gpt_model(arch)
    trajectories = _trajectories(arch.vocab_size)

    # plain torch: each trajectory alone, full vocabulary (TP = 1), mean over its response tokens
    expected = []
    with torch.no_grad():
        for t in trajectories:
            seq = torch.tensor(t.prompt_ids + t.response_ids)
            logits = model(seq[None, :-1], torch.arange(seq.numel() - 1)[None], None)[0, :, :arch.vocab_size]
            lp = torch.log_softmax(logits.double(), -1).gather(-1, seq[1:, None])[:, 0]
            expected.append(lp[len(t.prompt_ids) - 1:].mean())
    expected = torch.stack(expected)

    ddp, opt, sched = wrap_for_training(model, lr=0.0, weight_decay=0.0, clip_grad=1e6, use_distributed_optimizer=False)
    objective = ObjectiveConfig()
    out = {"expected": expected, "layouts": {}}

    def run(key, ddp, opt, sched, **layout):
        data = build_step_data(trajectories, micro_batch_size=2, pad_id=0, **layout)
        if layout.get("max_tokens_per_forward"):
            assert len(data.forward_micro_batches) < len(data.micro_batches)
        old = old_logprobs(ddp, data, vocab_size=arch.vocab_size, temperature=1.0, device=torch.device("cpu"))
        assert len(old.per_micro_batch) == len(data.micro_batches)
        for mb, lp in zip(data.micro_batches, old.per_micro_batch):
            assert lp.shape == mb.tokens.shape
        plan = plan_batch(objective, group_ids=data.group_ids, response_lengths=data.response_lengths,
                          correct=data.correct, student_logprob_mean=old.trajectory_means.float(),
                          teacher_logprob_mean=data.teacher_logprob_mean.float(), rewards=data.rewards)
        results = {}
        for name, lp_old in (("old", old), ("none", None)):
            loss_fn = make_loss_fn(objective, plan, vocab_size=arch.vocab_size, temperature=1.0, supervised=False,
                                   use_topk=False, old_logprobs=lp_old)
            step = train_step(ddp, opt, sched, data.micro_batches, loss_fn)
            results[name] = (step.loss, step.grad_norm)
        out["layouts"][key] = {"means": old.trajectory_means, "results": results}

    for budget, forward in LAYOUTS:
        run((budget, forward, 1), ddp, opt, sched, dp=world, dp_rank=rank, max_tokens_per_microbatch=budget,
            max_tokens_per_forward=forward)
    # context parallelism: both ranks hold chunks of every packed trajectory (DP = 1)
    layout = init_parallel(1, 1, cp=2)
    cp_model = build_gpt_model(arch)
    cp_model.load_state_dict(model.state_dict())
    cp_ddp, cp_opt, cp_sched = wrap_for_training(cp_model, lr=0.0, weight_decay=0.0, clip_grad=1e6,
                                                 use_distributed_optimizer=False)
    for budget, forward in ((24, None), (24, 4096)):
        run((budget, forward, 2), cp_ddp, cp_opt, cp_sched, dp=1, dp_rank=0, max_tokens_per_microbatch=budget,
            max_tokens_per_forward=forward, cp_size=2, cp_rank=layout.cp_rank)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker, world_size=2, timeout=300)


def test_old_logprob_means_match_plain_torch_in_every_layout(ranks):
    for out in ranks:
        for budget, layout in out["layouts"].items():
            torch.testing.assert_close(layout["means"], out["expected"], rtol=0, atol=2e-6, msg=f"layout {budget}")
    padded = (None, None, 1)
    torch.testing.assert_close(ranks[0]["layouts"][padded]["means"], ranks[1]["layouts"][padded]["means"], rtol=0, atol=0)


def test_loss_is_layout_independent_and_old_logprobs_line_up(ranks):
    reference_loss, reference_norm = ranks[0]["layouts"][(None, None, 1)]["results"]["none"]
    assert reference_norm > 0
    for out in ranks:
        for budget, layout in out["layouts"].items():
            for name, (loss, norm) in layout["results"].items():
                assert loss == pytest.approx(reference_loss, rel=1e-5, abs=1e-7), (budget, name)
                assert norm == pytest.approx(reference_norm, rel=1e-4), (budget, name)
