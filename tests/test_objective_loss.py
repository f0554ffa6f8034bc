"""The full objective (SCOPE and baselines) against an independent single-process full-vocabulary
reference written with plain loops: same value and gradients for any micro-batch split and for a
TP=2 x DP=2 layout (gloo processes); bad input; the megatron loss contract."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from scope_megatron.objective import (
    ObjectiveConfig,
    objective_loss,
    plan_batch,
    sequence_mean_logprob,
    vocab_parallel_logprobs,
    vocab_parallel_topk_kl,
)
from tests.dist_utils import run_ranks

VOCAB, PADDED, TOPK, TEMPERATURE = 250, 256, 4, 0.8
B, S = 8, 7
GROUPS = [0, 0, 0, 1, 1, 1, 2, 2]  # group 0 mixed, 1 all correct, 2 all wrong
CORRECT = [True, False, True, True, True, True, False, False]
# response positions per row (prompt before, padding after); row lengths 1..6
RESPONSE = [(1, 5), (2, 7), (0, 3), (3, 4), (1, 7), (2, 6), (0, 7), (4, 6)]


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, S, PADDED, generator=g)
    logits[..., VOCAB:] = 30.0  # padded vocabulary columns must be ignored
    targets = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    for row, (start, stop) in enumerate(RESPONSE):
        mask[row, start:stop] = True
    with torch.no_grad():
        current = torch.log_softmax(logits[..., :VOCAB] / TEMPERATURE, -1).gather(-1, targets[..., None])[..., 0]
    old = current + 0.3 * torch.randn(B, S, generator=g)  # rho != 1 (a later PPO epoch)
    teacher = current - torch.rand(B, S, generator=g)
    teacher_full = torch.log_softmax(2.0 * torch.randn(B, S, VOCAB, generator=g), -1)
    top_lp, top_ids = teacher_full.topk(TOPK, -1)
    # an engine policy older than lp_old: importance ratios on both sides of 1, some above the TIS caps
    rollout_off_policy = old + 0.6 * torch.randn(B, S, generator=g)
    return {"logits": logits, "targets": targets, "mask": mask, "old": old, "teacher": teacher, "ref": current - 0.2,
            "rollout": old + 0.01, "rollout_off_policy": rollout_off_policy, "topk_ids": top_ids, "topk_lp": top_lp,
            "groups": torch.tensor(GROUPS), "correct": torch.tensor(CORRECT), "rewards": torch.tensor(CORRECT).float()}


CONFIGS = {
    "scope": ObjectiveConfig(),
    "scope_sum1_paper_clip_topk": ObjectiveConfig(normalize="sum1", aggregation="paper_token_sum", clip_eps=0.2,
                                                  topk_kl="forward", topk_kl_coef=0.5, tau=0.7, mle_coef=0.8),
    "scope_path_mean_nll_reversed": ObjectiveConfig(aggregation="path_token_mean", mle_form="nll",
                                                    student_sign="reversed", teacher_uniform=True),
    "opd": ObjectiveConfig.preset("opd"),
    "grpo_k3": ObjectiveConfig.preset("grpo", grpo_kl_beta=0.1),
    "kd": ObjectiveConfig.preset("kd"),
    # truncated importance sampling against the engine's log-probs, on every path and baseline
    "scope_tis_topk_clip": ObjectiveConfig(off_policy_correction="tis", tis_cap=1.5, clip_eps=0.2, topk_kl="forward"),
    "scope_nll_tis": ObjectiveConfig(off_policy_correction="tis", tis_cap=2.0, mle_form="nll"),
    "opd_tis": ObjectiveConfig.preset("opd", off_policy_correction="tis", tis_cap=1.2),
    "grpo_k3_tis": ObjectiveConfig.preset("grpo", grpo_kl_beta=0.1, off_policy_correction="tis", tis_cap=1.5),
}


def rollout_logprobs_for(config: ObjectiveConfig, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["rollout_off_policy"] if config.off_policy_correction == "tis" else batch["rollout"]


# ------------------------------------------------------------------------------------------
# the independent reference: explicit loops over groups, trajectories and tokens, fp64
# ------------------------------------------------------------------------------------------


def reference_weights(config: ObjectiveConfig, mean_old: list[float], mean_teacher: list[float]) -> tuple[list, list]:
    w_s, w_t = [0.0] * B, [0.0] * B
    for g in set(GROUPS):
        for is_correct, out in ((True, w_s), (False, w_t)):
            members = [i for i in range(B) if GROUPS[i] == g and CORRECT[i] == is_correct]
            if not members:
                continue
            if is_correct:  # Eq. 4: PPL_S^(1/tau), or PPL_S^(-1/tau) reversed
                sign = 1.0 if config.student_sign == "paper" else -1.0
                raw = [0.0 if config.student_uniform else sign * -mean_old[i] / config.tau for i in members]
            else:  # Eq. 5: PPL_T^(-1/tau)
                sign = 1.0 if config.teacher_sign == "paper" else -1.0
                raw = [0.0 if config.teacher_uniform else sign * mean_teacher[i] / config.tau for i in members]
            total = sum(math.exp(r) for r in raw)
            scale = len(members) if config.normalize == "mean1" else 1.0
            for i, r in zip(members, raw):
                out[i] = scale * math.exp(r) / total
    return w_s, w_t


def clipped_pg(rho: torch.Tensor, advantage: float | torch.Tensor, eps: float | None) -> torch.Tensor:
    if eps is None:
        return -rho * advantage
    return -torch.min(rho * advantage, rho.clamp(1 - eps, 1 + eps) * advantage)


def reference_loss(config: ObjectiveConfig, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    x = batch["logits"].double().requires_grad_(True)
    logp = torch.log_softmax(x[..., :VOCAB] / TEMPERATURE, -1)
    lp = logp.gather(-1, batch["targets"][..., None])[..., 0]
    mask, old, teacher = batch["mask"], batch["old"].double(), batch["teacher"].double()
    rows = [mask[i].nonzero().flatten().tolist() for i in range(B)]
    mean_old = [float(old[i, rows[i]].mean()) for i in range(B)]
    mean_teacher = [float(teacher[i, rows[i]].mean()) for i in range(B)]
    n_all = sum(len(r) for r in rows)
    n_correct = sum(len(rows[i]) for i in range(B) if CORRECT[i])
    n_wrong = n_all - n_correct
    n_groups = len(set(GROUPS))
    eps = config.clip_eps
    mle = kl = policy = torch.zeros((), dtype=torch.float64)
    if config.method == "scope":
        w_s, w_t = reference_weights(config, mean_old, mean_teacher)
    elif config.method == "opd":
        w_s, w_t = [0.0] * B, [1.0] * B
    else:
        w_s, w_t = [1.0] * B, [0.0] * B
    if config.method == "grpo":
        adv = []
        for i in range(B):
            r = [float(CORRECT[j]) for j in range(B) if GROUPS[j] == GROUPS[i]]
            mean = sum(r) / len(r)
            std = math.sqrt(sum((v - mean) ** 2 for v in r) / (len(r) - 1))
            adv.append(0.0 if std == 0 else (float(CORRECT[i]) - mean) / (std + config.grpo_eps))
    rollout = rollout_logprobs_for(config, batch).double()
    for i in range(B):
        for t in rows[i]:
            rho = torch.exp(lp[i, t] - old[i, t])
            # truncated importance weight of the token: min(pi_old / pi_engine, C), a constant
            tis = min(math.exp(float(old[i, t] - rollout[i, t])), config.tis_cap) \
                if config.off_policy_correction == "tis" else 1.0
            if config.method == "grpo":
                d = batch["ref"][i, t].double() - lp[i, t]
                policy = policy + tis * (clipped_pg(rho, adv[i], eps) + config.grpo_kl_beta * (torch.exp(d) - d - 1))
                continue
            if config.method == "kd" or config.mle_form == "nll":
                mle = mle - tis * w_s[i] * lp[i, t]
            else:
                mle = mle + tis * clipped_pg(rho, w_s[i], eps)
            if config.method in ("scope", "opd") and w_t[i] > 0:
                kl = kl + tis * clipped_pg(rho, -w_t[i] * float(old[i, t] - teacher[i, t]), eps)
                if config.topk_kl == "forward":
                    q = torch.softmax(batch["topk_lp"][i, t].double(), -1)
                    student = logp[i, t, batch["topk_ids"][i, t]]
                    kl = kl + tis * config.topk_kl_coef * w_t[i] * (q * (q.log() - student)).sum()
    divisor = {"ref_token_mean": (n_correct, n_all), "path_token_mean": (n_correct, n_wrong),
               "token_mean": (n_all, n_all), "paper_token_sum": (n_groups, n_groups)}[config.aggregation]
    if config.method == "opd":
        divisor = (divisor[0], n_all if config.aggregation != "paper_token_sum" else n_groups)
    if config.method == "kd":
        divisor = (n_all, n_all)
    loss = config.mle_coef * mle / divisor[0] + config.kl_coef * kl / divisor[1] + policy / n_all
    loss.backward()
    return float(loss.detach()), x.grad


# ------------------------------------------------------------------------------------------
# the library, split into micro-batches on (tp_rank of tp) x (dp_rank of dp)
# ------------------------------------------------------------------------------------------


def plan_for(config: ObjectiveConfig, batch: dict[str, torch.Tensor], **extra):
    """plan_batch over the whole test batch (sequence means of the old and teacher log-probs)."""
    mask = batch["mask"]
    return plan_batch(config, group_ids=batch["groups"], response_lengths=mask.sum(1), correct=batch["correct"],
                      student_logprob_mean=sequence_mean_logprob(batch["old"], mask),
                      teacher_logprob_mean=sequence_mean_logprob(batch["teacher"], mask), **extra)


def library_loss(config: ObjectiveConfig, batch: dict[str, torch.Tensor], micro_rows: list[list[int]],
                 tp_rank: int = 0, tp: int = 1, tp_group=None) -> tuple[float, torch.Tensor, dict[str, float]]:
    """Loss summed over ``micro_rows`` and d(loss)/d(this vocab shard of the logits)."""
    mask = batch["mask"]
    plan = plan_for(config, batch, rewards=batch["rewards"])
    shard = PADDED // tp
    x = batch["logits"][..., tp_rank * shard:(tp_rank + 1) * shard].clone().requires_grad_(True)
    total, metrics = 0.0, {}
    for rows in micro_rows:
        index = torch.tensor(rows, dtype=torch.long)
        topk = None
        if config.topk_kl != "none":
            res = vocab_parallel_topk_kl(x[index], batch["targets"][index], batch["topk_ids"][index],
                                         batch["topk_lp"][index], vocab_size=VOCAB, direction=config.topk_kl,
                                         tail=config.topk_tail, temperature=TEMPERATURE, tp_group=tp_group,
                                         return_entropy=True, chunk_tokens=5)
            lp, entropy, topk = res.target_logprobs, res.entropy, res.topk_kl
        else:
            lp, entropy = vocab_parallel_logprobs(x[index], batch["targets"][index], vocab_size=VOCAB,
                                                  temperature=TEMPERATURE, tp_group=tp_group, return_entropy=True,
                                                  chunk_tokens=5)
        out = objective_loss(config, plan.select(index), plan.denominators, logprobs=lp, response_mask=mask[index],
                             old_logprobs=batch["old"][index], teacher_logprobs=batch["teacher"][index],
                             ref_logprobs=batch["ref"][index],
                             rollout_logprobs=rollout_logprobs_for(config, batch)[index],
                             entropy=entropy, topk_kl=topk)
        out.loss.backward()
        total += float(out.loss.detach())
        for key, value in out.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value)
    return total, x.grad, metrics


SPLITS = {
    "one": [list(range(B))],
    "two": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "uneven_shuffled": [[5], [0, 7, 2], [6, 1, 4, 3]],
}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_match_reference_for_any_microbatch_split(name, split):
    batch = make_batch()
    config = CONFIGS[name]
    expected_loss, expected_grad = reference_loss(config, batch)
    loss, grad, _ = library_loss(config, batch, SPLITS[split])
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert bool((grad[..., VOCAB:] == 0).all())


def _to_bytes(obj) -> bytes:
    buffer = io.BytesIO()  # tensors travel serialised (see test_objective_logprobs.to_bytes)
    torch.save(obj, buffer)
    return buffer.getvalue()


def _layout_worker(rank: int, world: int, tp: int, names: list[str]) -> bytes:
    """TP x DP grid: TP groups are consecutive ranks; DP rank d takes every dp-th trajectory
    (so prompt groups are split across DP ranks) in two micro-batches."""
    dp = world // tp
    tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(dp)]
    tp_rank, dp_rank = rank % tp, rank // tp
    mine = list(range(dp_rank, B, dp))
    micro = [mine[: len(mine) // 2], mine[len(mine) // 2:]]
    batch = make_batch()
    out = {}
    for name in names:
        loss, grad, metrics = library_loss(CONFIGS[name], batch, micro, tp_rank, tp, tp_groups[dp_rank])
        out[name] = (loss, grad, metrics)
    return _to_bytes(out)


@pytest.fixture(scope="module")
def tp2_dp2_results() -> list[dict]:
    results = run_ranks(_layout_worker, 4, args=(2, list(CONFIGS)), timeout=180)
    return [torch.load(io.BytesIO(r), weights_only=False) for r in results]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tp2_dp2_layout_matches_reference(tp2_dp2_results, name):
    batch = make_batch()
    expected_loss, expected_grad = reference_loss(CONFIGS[name], batch)
    tp, dp = 2, 2
    # the DP ranks' losses add up to the full-batch loss (each TP rank holds the same value)
    for tp_rank in range(tp):
        total = sum(tp2_dp2_results[d * tp + tp_rank][name][0] for d in range(dp))
        assert total == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    # summing the DP ranks' gradients (what DDP does) and joining the TP shards gives the full gradient
    shards = [sum(tp2_dp2_results[d * tp + t][name][1] for d in range(dp)) for t in range(tp)]
    torch.testing.assert_close(torch.cat(shards, -1).double(), expected_grad, rtol=1e-4, atol=1e-7)
    # additive metrics: the per-rank sums add up to the single-process values
    _, _, single = library_loss(CONFIGS[name], batch, SPLITS["one"])
    for key, value in single.items():
        assert sum(tp2_dp2_results[d * tp][name][2][key] for d in range(dp)) == pytest.approx(value, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------
# metrics, presets, the megatron contract
# ------------------------------------------------------------------------------------------


def test_plan_metrics_and_microbatch_metrics_hand_checked():
    batch = make_batch()
    mask = batch["mask"]
    config = CONFIGS["scope"]
    plan = plan_for(config, batch)
    m = plan.metrics
    assert (m["groups/all_correct_fraction"], m["groups/all_wrong_fraction"], m["groups/mixed_fraction"]) == (
        pytest.approx(1 / 3), pytest.approx(1 / 3), pytest.approx(1 / 3))
    lengths = [stop - start for start, stop in RESPONSE]
    assert m["tokens/mle_path"] == sum(n for n, c in zip(lengths, CORRECT) if c)
    assert m["tokens/kl_path"] == sum(n for n, c in zip(lengths, CORRECT) if not c)
    assert plan.denominators.groups == 3 and plan.denominators.response_tokens == sum(lengths)
    assert 0.0 <= m["weight_entropy/student"] <= m["weight_entropy/student_uniform"]
    ppl = torch.exp(-sequence_mean_logprob(batch["teacher"], mask).double())
    assert m["ppl/teacher_mean"] == pytest.approx(float(ppl.mean()))
    _, _, metrics = library_loss(config, batch, SPLITS["two"])
    # train-vs-rollout difference: old - rollout = -0.01 on every response token
    assert metrics["mismatch/train_minus_rollout"] == pytest.approx(-0.01, abs=1e-5)
    assert metrics["mismatch/abs"] == pytest.approx(0.01, abs=1e-5)
    k1 = float(((batch["old"] - batch["teacher"])[mask]).mean())
    assert metrics["kl/sampled_k1"] == pytest.approx(k1, rel=1e-5)
    assert metrics["loss/total"] == pytest.approx(metrics["loss/mle"] + metrics["loss/kl"], rel=1e-6)


def test_tis_metrics_hand_checked_and_off_by_default():
    batch = make_batch()
    mask = batch["mask"]
    config = CONFIGS["scope_tis_topk_clip"]
    raw = torch.exp(batch["old"] - batch["rollout_off_policy"])[mask].double()
    assert bool((raw > config.tis_cap).any()) and bool((raw < 1).any())  # the case is not trivial
    _, _, metrics = library_loss(config, batch, SPLITS["uneven_shuffled"])
    assert metrics["tis/truncated_fraction"] == pytest.approx(float((raw > config.tis_cap).double().mean()), rel=1e-5)
    assert metrics["tis/mean_weight"] == pytest.approx(float(raw.clamp(max=config.tis_cap).mean()), rel=1e-5)
    _, _, plain = library_loss(CONFIGS["scope"], batch, SPLITS["two"])
    assert not any(key.startswith("tis/") for key in plain)


def test_tis_needs_rollout_logprobs_and_sampled_data():
    batch = make_batch()
    config = CONFIGS["opd_tis"]
    plan = plan_for(config, batch)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        objective_loss(config, plan.coefficients, plan.denominators, logprobs=batch["old"].clone(),
                       response_mask=batch["mask"], teacher_logprobs=batch["teacher"])
    with pytest.raises(ValueError, match="off_policy_correction"):
        ObjectiveConfig.preset("sft", off_policy_correction="tis")
    with pytest.raises(ValueError, match="tis_cap"):
        ObjectiveConfig(off_policy_correction="tis", tis_cap=0.0)


def test_presets_are_the_paper_ablations():
    assert ObjectiveConfig.preset("scope") == ObjectiveConfig()
    assert ObjectiveConfig.preset("scope_uniform").student_uniform and ObjectiveConfig.preset("scope_uniform").teacher_uniform
    assert ObjectiveConfig.preset("scope_opposite_teacher").teacher_sign == "reversed"
    grpo = ObjectiveConfig.preset("grpo")  # the paper's baseline: with its KL to the initial policy
    assert (grpo.method, grpo.clip_eps, grpo.grpo_kl_beta) == ("grpo", 0.2, 1e-4)
    with pytest.raises(ValueError, match="unknown preset"):
        ObjectiveConfig.preset("nope")
    with pytest.raises(ValueError, match="clip_eps"):
        ObjectiveConfig(clip_eps=1.5)
    with pytest.raises(ValueError, match="aggregation"):
        ObjectiveConfig(aggregation="mean")  # type: ignore[arg-type]


def test_megatron_loss_tuple_restores_the_sum_of_microbatch_losses():
    batch = make_batch()
    mask = batch["mask"]
    config = CONFIGS["scope"]
    plan = plan_for(config, batch)
    lp = torch.log_softmax(batch["logits"][..., :VOCAB], -1).gather(-1, batch["targets"][..., None])[..., 0]
    losses, scaled, counts = 0.0, 0.0, 0
    for rows in SPLITS["uneven_shuffled"]:
        out = objective_loss(config, plan.select(rows), plan.denominators, logprobs=lp[rows], response_mask=mask[rows],
                             old_logprobs=batch["old"][rows], teacher_logprobs=batch["teacher"][rows])
        loss_sum, num_tokens, _ = out.megatron_loss_tuple(plan.denominators)
        assert num_tokens.dtype == torch.int64 and int(num_tokens) == int(mask[rows].sum())
        losses += float(out.loss.detach())
        scaled += float(loss_sum)
        counts += int(num_tokens)
    assert counts == plan.denominators.response_tokens
    assert scaled / counts == pytest.approx(losses, rel=1e-6)


# ------------------------------------------------------------------------------------------
# routing properties through the loss
# ------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.integers(1, 5), st.floats(-4, 0), st.floats(-4, 0)),
                min_size=1, max_size=12))
def test_property_all_correct_group_has_no_kl_tokens_and_all_wrong_no_mle_tokens(rows):
    groups = torch.tensor([r[0] for r in rows])
    correct = torch.tensor([r[1] for r in rows])
    lengths = torch.tensor([r[2] for r in rows])
    plan = plan_batch(ObjectiveConfig(), group_ids=groups, response_lengths=lengths, correct=correct,
                      student_logprob_mean=torch.tensor([r[3] for r in rows]),
                      teacher_logprob_mean=torch.tensor([r[4] for r in rows]))
    c = plan.coefficients
    for g in groups.unique():
        members = groups == g
        if correct[members].all():
            assert not c.on_kl_path[members].any() and bool((c.kl_weight[members] == 0).all())
        if not correct[members].any():
            assert not c.on_mle_path[members].any() and bool((c.mle_weight[members] == 0).all())
    assert plan.denominators.kl_tokens == int(lengths[~correct].sum())
    assert plan.denominators.mle_tokens == int(lengths[correct].sum())
    # through the loss: the KL term is exactly 0 on correct trajectories, the MLE term on wrong ones
    n, s = len(rows), int(lengths.max())
    mask = torch.arange(s)[None, :] < lengths[:, None]
    lp = torch.full((n, s), -1.0, requires_grad=True)
    out = objective_loss(ObjectiveConfig(), plan.coefficients, plan.denominators, logprobs=lp, response_mask=mask,
                         teacher_logprobs=torch.full((n, s), -2.0))
    out.loss.backward()
    assert (float(out.metrics["loss/kl"]) == 0.0) == bool(correct.all())
    assert (float(out.metrics["loss/mle"]) == 0.0) == bool((~correct).all())
    # correct rows get -w_stu / n_mle per token; wrong rows +w_tea * (lp_old - lp_T) / n_all
    d = plan.denominators
    expected = torch.where(correct[:, None], -c.mle_weight[:, None] / max(d.mle_tokens, 1),
                           c.kl_weight[:, None] * 1.0 / d.response_tokens) * mask
    torch.testing.assert_close(lp.grad, expected.float())


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def _plan_and_inputs(config: ObjectiveConfig = ObjectiveConfig()):
    batch = make_batch()
    plan = plan_for(config, batch)
    lp = batch["old"].clone().requires_grad_(True)
    return batch, plan, lp


def test_nan_outside_the_response_is_ignored_in_value_and_gradient():
    batch, plan, lp = _plan_and_inputs()
    mask = batch["mask"]
    reference = objective_loss(ObjectiveConfig(), plan.coefficients, plan.denominators, logprobs=lp,
                               response_mask=mask, old_logprobs=batch["old"], teacher_logprobs=batch["teacher"])
    reference.loss.backward()
    expected_grad = lp.grad.clone()
    nan = torch.tensor(float("nan"))
    poisoned = {k: torch.where(mask, batch[k], nan) for k in ("old", "teacher")}
    lp2 = torch.where(mask, batch["old"], nan).requires_grad_(True)
    out = objective_loss(ObjectiveConfig(), plan.coefficients, plan.denominators, logprobs=lp2, response_mask=mask,
                         old_logprobs=poisoned["old"], teacher_logprobs=poisoned["teacher"],
                         entropy=torch.where(mask, 1.0, nan))
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(reference.loss.detach()), rel=1e-6)
    torch.testing.assert_close(lp2.grad, expected_grad)
    assert bool((lp2.grad[~mask] == 0).all())
    assert all(math.isfinite(float(v)) for v in out.metrics.values())


def test_nan_or_inf_on_a_response_token_raises():
    batch, plan, lp = _plan_and_inputs()
    mask = batch["mask"]
    teacher = batch["teacher"].clone()
    teacher[0, 2] = float("-inf")  # a response token
    with pytest.raises(ValueError, match="teacher_logprobs"):
        objective_loss(ObjectiveConfig(), plan.coefficients, plan.denominators, logprobs=lp, response_mask=mask,
                       teacher_logprobs=teacher)
    bad_lp = lp.detach().clone()
    bad_lp[1, 3] = float("nan")
    with pytest.raises(ValueError, match="logprobs"):
        objective_loss(ObjectiveConfig(), plan.coefficients, plan.denominators, logprobs=bad_lp, response_mask=mask,
                       teacher_logprobs=batch["teacher"])


def test_microbatch_without_response_tokens_gives_zero_loss_and_gradient():
    batch, plan, _ = _plan_and_inputs()
    lp = torch.zeros(2, S, requires_grad=True)
    out = objective_loss(ObjectiveConfig(), plan.select([0, 1]), plan.denominators, logprobs=lp,
                         response_mask=torch.zeros(2, S, dtype=torch.bool), teacher_logprobs=torch.zeros(2, S))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and int(out.num_tokens) == 0
    assert bool((lp.grad == 0).all())


def test_batch_without_correct_trajectories_has_finite_loss():
    groups = torch.tensor([0, 0, 1])
    correct = torch.zeros(3, dtype=torch.bool)
    lengths = torch.tensor([2, 3, 1])
    for aggregation in ("ref_token_mean", "path_token_mean"):
        config = ObjectiveConfig(aggregation=aggregation)
        plan = plan_batch(config, group_ids=groups, response_lengths=lengths, correct=correct,
                          student_logprob_mean=torch.full((3,), float("nan")),  # never read: no correct trajectory
                          teacher_logprob_mean=torch.tensor([-1.0, -2.0, -0.5]))
        assert plan.denominators.mle_tokens == 0
        mask = torch.arange(3)[None, :] < lengths[:, None]
        lp = torch.full((3, 3), -1.0, requires_grad=True)
        out = objective_loss(config, plan.coefficients, plan.denominators, logprobs=lp, response_mask=mask,
                             teacher_logprobs=torch.full((3, 3), -1.5))
        out.loss.backward()
        assert float(out.metrics["loss/mle"]) == 0.0
        assert math.isfinite(float(out.loss.detach())) and float(out.loss.detach()) > 0
        assert bool(torch.isfinite(lp.grad).all())


def test_bad_shapes_and_missing_inputs_name_the_argument():
    batch, plan, lp = _plan_and_inputs()
    mask = batch["mask"]
    config = ObjectiveConfig()
    call = lambda **kw: objective_loss(config, plan.coefficients, plan.denominators, **{
        "logprobs": lp, "response_mask": mask, "teacher_logprobs": batch["teacher"], **kw})
    with pytest.raises(ValueError, match="response_mask"):
        call(response_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="old_logprobs"):
        call(old_logprobs=batch["old"][:-1])
    with pytest.raises(ValueError, match="teacher_logprobs is required"):
        call(teacher_logprobs=None)
    with pytest.raises(ValueError, match="topk_kl is required"):
        objective_loss(ObjectiveConfig(topk_kl="forward"), plan.coefficients, plan.denominators, logprobs=lp,
                       response_mask=mask, teacher_logprobs=batch["teacher"])
    with pytest.raises(ValueError, match="B = 3"):
        objective_loss(config, plan.select([0, 1, 2]), plan.denominators, logprobs=lp, response_mask=mask,
                       teacher_logprobs=batch["teacher"])
    with pytest.raises(ValueError, match="token_trajectory"):
        objective_loss(config, plan.coefficients, plan.denominators, logprobs=lp.reshape(-1),
                       response_mask=mask.reshape(-1), teacher_logprobs=batch["teacher"].reshape(-1),
                       token_trajectory=torch.full((B * S,), B))


def test_packed_layout_equals_padded_layout():
    batch, plan, lp = _plan_and_inputs()
    mask = batch["mask"]
    config = ObjectiveConfig(clip_eps=0.2)
    padded = objective_loss(config, plan.coefficients, plan.denominators, logprobs=lp, response_mask=mask,
                            old_logprobs=batch["old"] + 0.1, teacher_logprobs=batch["teacher"])
    flat = lambda t: t[mask]  # packed: only the response tokens, trajectory ids alongside
    rows = torch.arange(B)[:, None].expand(B, S)[mask]
    packed = objective_loss(config, plan.coefficients, plan.denominators, logprobs=flat(lp), response_mask=flat(mask),
                            old_logprobs=flat(batch["old"] + 0.1), teacher_logprobs=flat(batch["teacher"]),
                            token_trajectory=rows)
    assert float(packed.loss.detach()) == pytest.approx(float(padded.loss.detach()), rel=1e-6)


def test_zero_length_response_and_empty_batch_raise_in_plan():
    with pytest.raises(ValueError, match="response_lengths"):
        plan_batch(ObjectiveConfig.preset("opd"), group_ids=torch.tensor([0, 0]), response_lengths=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="group_ids is empty"):
        plan_batch(ObjectiveConfig.preset("opd"), group_ids=torch.zeros(0, dtype=torch.long),
                   response_lengths=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="correct is required"):
        plan_batch(ObjectiveConfig(), group_ids=torch.tensor([0]), response_lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="student_logprob_mean"):
        plan_batch(ObjectiveConfig(), group_ids=torch.tensor([0, 0]), response_lengths=torch.tensor([1, 1]),
                   correct=torch.tensor([True, False]), student_logprob_mean=torch.tensor([-1.0]),
                   teacher_logprob_mean=torch.tensor([-1.0, -1.0]))
