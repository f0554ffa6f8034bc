"""Top-k KL to the teacher through the whole loop (``algorithm.topk_kl``), checked with plain transformers.

One step of the tiny config with ``algorithm.topk_kl=forward``, ``topk_k=8`` and the rollouts saved
(``logging.save_rollouts``). Independent references, from the saved trajectories:
- the teacher top-k the engine returned equals transformers' top-8 of the teacher's log-softmax at
  every response position;
- the step's ``kl/topk`` equals the forward KL of the renormalised teacher top-8 against the initial
  student's log-probs at those ids (logits / rollout temperature), averaged over response tokens,
  computed with transformers and plain torch.
The run uses packed micro-batches, so the [T, K] extras go through packing as well.

Replaying those saved rollouts (``data.replay``, no engines) from the same student trains on the
same numbers: step 1's loss, KL terms and gradient norm are the original run's, bit for bit; and
with ``algorithm.old_logprobs: rollout`` the SCOPE means come from the engine's log-probs.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.loop_utils import asset_overrides, read_metrics, run_train, tail

pytestmark = pytest.mark.timeout(300)
K = 8
RUN = ["steps=1", "algorithm.topk_kl=forward", f"algorithm.topk_k={K}", "parallel.max_tokens_per_microbatch=128",
       "rollout.max_new_tokens=24", "checkpoint.every=0", "checkpoint.save_at_end=false"]  # no checkpoint is read
TEMPERATURE = 0.6  # configs/tiny_cpu.yaml's rollout temperature: student log-probs use logits / 0.6


@pytest.fixture(scope="module")
def topk_run(tmp_path_factory):
    from scope_megatron.examples.tiny import prepare

    root = tmp_path_factory.mktemp("topk")
    assets = prepare(root / "tiny")
    run_dir = root / "run"
    proc = run_train(*asset_overrides(assets, run_dir), *RUN, "logging.save_rollouts=true", timeout=240)
    assert proc.returncode == 0, tail(proc)
    rollouts = [json.loads(line) for line in (run_dir / "rollouts" / "step_00000001.jsonl").read_text().splitlines()]
    return assets, run_dir, rollouts


def _response_logprobs(hf_dir, trajectory, temperature: float = 1.0) -> torch.Tensor:
    """[R, vocab] log-softmax(logits / temperature) at the positions predicting each response token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt, response = trajectory["prompt_ids"], trajectory["response_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    p = len(prompt)
    return torch.log_softmax(logits[p - 1:p - 1 + len(response)] / temperature, dim=-1)


def test_teacher_topk_matches_transformers(topk_run):
    assets, _, rollouts = topk_run
    assert rollouts and all(len(t["teacher_topk_ids"]) == len(t["response_ids"]) for t in rollouts)
    for t in rollouts:
        teacher = _response_logprobs(assets["teacher"], t)
        values, ids = teacher.topk(K, dim=-1)
        for j, (row_ids, row_lp) in enumerate(zip(t["teacher_topk_ids"], t["teacher_topk_logprobs"])):
            order = sorted(range(K), key=lambda i: -row_lp[i])
            assert [row_ids[i] for i in order] == ids[j].tolist(), (t["sample"], j)
            assert [row_lp[i] for i in order] == pytest.approx(values[j].tolist(), abs=1e-4)


def test_topk_kl_metric_equals_plain_torch(topk_run):
    assets, run_dir, rollouts = topk_run
    total, count = 0.0, 0
    for t in rollouts:
        student = _response_logprobs(assets["student"], t, TEMPERATURE)  # the weights before step 1's update
        ids = torch.tensor(t["teacher_topk_ids"])
        log_q = torch.tensor(t["teacher_topk_logprobs"], dtype=torch.float64)
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)  # the teacher renormalised on its top-k
        log_p = student.gather(-1, ids)
        total += (log_q.exp() * (log_q - log_p)).sum().item()
        count += len(t["response_ids"])
    metrics = read_metrics(run_dir)[1]
    # fp32 megatron vs fp64 transformers agree to ~1e-8 here; near-uniform random models make wrong
    # ids or log-probs move the value by only ~1e-4 relative, so the tolerance is tight
    assert metrics["kl/topk"] == pytest.approx(total / count, rel=1e-6)
    assert metrics["kl/topk"] > 0.01  # random tiny models disagree: the check is not vacuous


def test_replay_reproduces_the_step(topk_run, tmp_path):
    assets, run_dir, rollouts = topk_run
    replay_dir = tmp_path / "replay"
    proc = run_train(*asset_overrides(assets, replay_dir), *RUN, f"data.replay={run_dir}", timeout=240)
    assert proc.returncode == 0, tail(proc)
    assert "replaying" in proc.stderr and not (replay_dir / "engines").exists()  # no engine was started
    original, replayed = read_metrics(run_dir)[1], read_metrics(replay_dir)[1]
    for key in ("loss/total", "loss/mle", "loss/kl", "kl/topk", "train/grad_norm", "train/loss_tokens",
                "objective/ppl/student_mean", "objective/ppl/teacher_mean", "reward/accuracy"):
        assert replayed[key] == original[key], key
    assert replayed["rollout/trajectories"] == len(rollouts)


def test_old_logprobs_from_the_rollout_engine(topk_run, tmp_path):
    """``algorithm.old_logprobs: rollout`` on the saved batch (a replay) whose engine log-probs are
    shifted by -0.5 (on CPU the fp32 engine agrees with the trainer to ~1e-7, so unshifted values
    could not tell the two sources apart): no forward-only pass runs, the SCOPE student means are
    the shifted engine ones, and the trainer-minus-engine mismatch moves by exactly the shift."""
    import json
    import math

    assets, run_dir, rollouts = topk_run
    shifted = [{**t, "rollout_logprobs": [lp - 0.5 for lp in t["rollout_logprobs"]]} for t in rollouts]
    saved = tmp_path / "saved" / "rollouts"
    saved.mkdir(parents=True)
    (saved / "step_00000001.jsonl").write_text("".join(json.dumps(t) + "\n" for t in shifted))
    replay_dir = tmp_path / "rollout_means"
    proc = run_train(*asset_overrides(assets, replay_dir), *RUN, f"data.replay={saved.parent}",
                     "algorithm.old_logprobs=rollout", timeout=240)
    assert proc.returncode == 0, tail(proc)
    original, cheap = read_metrics(run_dir)[1], read_metrics(replay_dir)[1]
    kept = [t for t in shifted if t["response_ids"]]
    engine_ppl = sum(math.exp(-sum(t["rollout_logprobs"]) / len(t["rollout_logprobs"])) for t in kept) / len(kept)
    assert cheap["objective/ppl/student_mean"] == pytest.approx(engine_ppl, rel=1e-6)
    assert cheap["objective/ppl/student_mean"] > 1.5 * original["objective/ppl/student_mean"]  # exp(0.5) = 1.65
    assert cheap["mismatch/train_minus_rollout"] == pytest.approx(original["mismatch/train_minus_rollout"] + 0.5,
                                                                  abs=1e-5)
    assert cheap["time/old_logprobs"] < 0.05 * original["time/old_logprobs"]  # the pass did not run
