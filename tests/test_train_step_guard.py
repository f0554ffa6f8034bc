"""``train_step`` skips an update whose global gradient norm is NaN/inf: weights, Adam state and the
LR schedule are untouched, and the next good step gives exactly the weights of a run that never
saw the bad batch. Without the guard megatron's optimizer applies the NaN update (shown too), so
the check is what keeps a bad batch out of the weights."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks


def _snapshot(model, optimizer, scheduler) -> dict:
    """Model weights, the optimizer's main params and Adam state, the scheduler's step count."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    state = []
    for sub in subs:
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                state.append({k: v.clone() if torch.is_tensor(v) else v for k, v in sub.optimizer.state[p].items()})
    return {"weights": [p.detach().clone() for p in model.parameters()],
            "main": [p.detach().clone() for p in optimizer.get_parameters()],
            "adam": state, "scheduler_steps": scheduler.num_steps}


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if torch.is_tensor(x):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return eq(a, b)


def _guard_worker(rank: int, world: int, dist_opt: bool) -> dict:
    from scope_megatron.batch import MicroBatch, TokenFields
    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model.arch import arch_from_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.objective import vocab_parallel_logprobs
    from scope_megatron.parallel import init_parallel
    from scope_megatron.examples.tiny_models import tiny_hf_config

    init_parallel(1, 1)  # DP = 2
    arch = arch_from_hf_config(tiny_hf_config("qwen3").to_dict())
    gen = torch.Generator().manual_seed(5 + rank)
    tokens = torch.randint(0, arch.vocab_size, (2, 9), generator=gen)
    mb = MicroBatch(tokens[:, :-1], TokenFields(targets=tokens[:, 1:]), 16)

    def loss_fn(poison: float):
        def fn(logits, batch):
            share = -vocab_parallel_logprobs(logits, batch.fields.targets, vocab_size=arch.vocab_size).sum() / 32
            # only rank 1 sees the bad batch: the DP all-reduce carries it to every rank's gradient
            return share * (poison if rank == 1 else 1.0), {}
        return fn

    initial: list[torch.Tensor] = []

    def build():
        """A fresh model with the first build's initial weights, its DDP wrapper, optimizer, schedule."""
        model = build_gpt_model(arch)
        with torch.no_grad():
            if initial:
                for p, w in zip(model.parameters(), initial):
                    p.copy_(w)
            else:
                initial.extend(p.detach().clone() for p in model.parameters())
        ddp, opt, sched = wrap_for_training(model, lr=1e-2, clip_grad=0.5, use_distributed_optimizer=dist_opt)
        return model, ddp, opt, sched

    out: dict = {}
    # run A: good, NaN, inf, good
    model, ddp, opt, sched = build()
    first = train_step(ddp, opt, sched, [mb], loss_fn(1.0))
    out["first_ok"] = first.update_successful
    before = _snapshot(model, opt, sched)
    for name, poison in (("nan", float("nan")), ("inf", float("inf"))):
        bad = train_step(ddp, opt, sched, [mb], loss_fn(poison))
        out[f"{name}_successful"] = bad.update_successful
        out[f"{name}_norm_finite"] = bool(torch.isfinite(torch.tensor(bad.grad_norm)))
        out[f"{name}_untouched"] = _same(before, _snapshot(model, opt, sched))
    after = train_step(ddp, opt, sched, [mb], loss_fn(1.0))
    out["after_ok"] = after.update_successful
    weights_a = [p.detach().clone() for p in model.parameters()]

    # run B: good, good (never saw the bad batches)
    model, ddp, opt, sched = build()
    train_step(ddp, opt, sched, [mb], loss_fn(1.0))
    second = train_step(ddp, opt, sched, [mb], loss_fn(1.0))
    out["grad_norm_a"], out["grad_norm_b"] = after.grad_norm, second.grad_norm
    out["same_as_clean_run"] = all(torch.equal(a, b) for a, b in zip(weights_a, model.parameters()))

    # megatron's own step without the guard: the NaN reaches the weights
    model, ddp, opt, sched = build()
    train_step(ddp, opt, sched, [mb], loss_fn(1.0), skip_nonfinite=False)
    train_step(ddp, opt, sched, [mb], loss_fn(float("nan")), skip_nonfinite=False)
    out["unguarded_weights_nan"] = any(bool(torch.isnan(p).any()) for p in model.parameters())
    return out


def _both_optimizers_worker(rank: int, world: int) -> dict[bool, dict]:
    """:func:`_guard_worker` with the distributed optimizer and with the plain one, in one spawn."""
    return {dist_opt: _guard_worker(rank, world, dist_opt) for dist_opt in (True, False)}


@pytest.fixture(scope="module")
def guard_results() -> list[dict[bool, dict]]:
    # one spawn of 2 ranks for both variants: process start-up dominates the run time
    return run_ranks(_both_optimizers_worker, world_size=2, timeout=300)


@pytest.mark.parametrize("dist_opt", [True, False], ids=["distopt", "opt"])
def test_nonfinite_gradient_skips_update_inside_train_step(dist_opt, guard_results):
    per_rank = [rank_out[dist_opt] for rank_out in guard_results]
    for got in per_rank:
        assert got["first_ok"] and got["after_ok"]
        for name in ("nan", "inf"):
            assert got[f"{name}_successful"] is False
            assert not got[f"{name}_norm_finite"]
            assert got[f"{name}_untouched"], f"a {name} step changed weights, Adam state or the LR schedule"
        assert got["grad_norm_a"] == pytest.approx(got["grad_norm_b"], rel=1e-6)
        assert got["same_as_clean_run"]
        assert got["unguarded_weights_nan"]
