"""Exact resume: 4 steps in one run == 2 steps, stop, resume for 2 (losses, metrics, weights).

Also: killing the student engine mid-run aborts with a clear error and leaves the last
checkpoint loadable (model, optimizer, scheduler and data position; the weights equal the live
run's HF export of that step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from scope_megatron.trainer.checkpointing import find_latest, list_checkpoints
from tests.dist_utils import run_ranks
from tests.loop_utils import REPO, asset_overrides, load_safetensors, loop_env, read_metrics, run_train, tail, \
    train_cmd

pytestmark = pytest.mark.timeout(600)  # generous: CI machines may be slower or loaded
# quantities that depend only on the trained weights and the (seeded) rollouts
EXACT = ("loss/total", "loss/mle", "loss/kl", "train/grad_norm", "train/lr", "reward/accuracy", "kl/sampled_k1",
         "policy_entropy", "response/length_mean", "prompt/length_mean", "objective/weight_max/student",
         "objective/weight_max/teacher", "objective/ppl/student_mean", "objective/ppl/teacher_mean",
         "train/loss_tokens")



def test_resume_continues_exactly(assets, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    # engines decode one request at a time: their log-probs then do not depend on which requests
    # happened to share a batch (float summation order), so everything below can be compared exactly
    common = ["checkpoint.every=2", "checkpoint.keep_last=0", "checkpoint.export_hf_steps=[4]",
              "rollout.embedded_max_batch_size=1", "teacher.embedded_max_batch_size=1"]
    # the 4-step run and the first half of the split run, concurrently
    procs = [subprocess.Popen(train_cmd(*asset_overrides(assets, run_dir), f"steps={steps}", *common), cwd=REPO,
                              env=loop_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run_dir, steps in ((full, 4), (split, 2))]
    for p in procs:
        out, err = p.communicate(timeout=480)
        assert p.returncode == 0, f"rc={p.returncode}\n{err[-4000:]}"
    assert [s for s, _ in list_checkpoints(split / "checkpoints")] == [2]
    resumed = run_train(*asset_overrides(assets, split), "steps=4", "checkpoint.resume=latest", *common)
    assert resumed.returncode == 0, tail(resumed)
    assert "resumed from" in resumed.stderr

    a, b = read_metrics(full), read_metrics(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in EXACT:
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
        same = [k for k in a[step] if not k.startswith(("time/", "perf/", "sync/seconds", "sync/transfer"))]
        assert len(same) > 60
        for key in same:
            assert a[step][key] == b[step].get(key), (step, key, a[step][key], b[step].get(key))
    # and so are the weights after step 4
    wa, wb = load_safetensors(full / "hf" / "step_00000004"), load_safetensors(split / "hf" / "step_00000004")
    assert set(wa) == set(wb) and len(wa) > 10
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # training moved them (otherwise equality says nothing)
    initial = load_safetensors(assets["student"])
    assert max((wa[n] - initial[n]).abs().max().item() for n in wa) > 1e-3


def test_killed_student_engine_aborts_clearly_and_checkpoint_survives(assets, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = train_cmd(*asset_overrides(assets, run_dir), "steps=50", "checkpoint.every=1", "checkpoint.keep_last=2",
                    "rollout.max_retries=1", "rollout.retry_backoff_s=0.1", "rollout.request_timeout_s=20",
                    "checkpoint.export_hf_every=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=loop_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 200
        while find_latest(run_dir / "checkpoints") is None or \
                list_checkpoints(run_dir / "checkpoints")[-1][0] < 2:
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint of step 2 within 200 s"
            time.sleep(0.2)
        pid = int((run_dir / "engines" / "student.pid").read_text())
        url = [line for line in (run_dir / "engines" / "student.log").read_text().splitlines() if "listening on" in line]
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-4000:]
    aborted = [line for line in err.splitlines() if "ABORTED" in line]
    assert aborted, err[-4000:]
    assert "student engine" in aborted[0] or "weight sync" in aborted[0], aborted[0]
    assert url and url[0].split()[-1] in aborted[0], (url, aborted[0])  # names the engine
    # the teacher engine process is gone too (no leaked servers)
    teacher_pid = int((run_dir / "engines" / "teacher.pid").read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(teacher_pid, 0)

    # the newest checkpoint is complete and loads: model, optimizer, scheduler, trainer state
    latest_step, latest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert latest_step >= 2
    out = run_ranks(_load_worker, world_size=1, args=(str(assets["student"]), str(latest)), timeout=120)[0]
    assert out["step"] == latest_step and "sampler" in out
    assert out["adam_steps"] == {float(latest_step)}  # one optimizer step per training step
    live = load_safetensors(run_dir / "hf" / f"step_{latest_step:08d}")  # written by the live run
    assert set(out["weights"]) == set(live)
    for name, value in live.items():
        assert torch.equal(out["weights"][name], value), name


def _load_worker(rank: int, world: int, hf_dir: str, ckpt: str) -> dict:
    from scope_megatron.megatron_step import wrap_for_training
    from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.model.hf_io import export_hf_tensors
    from scope_megatron.parallel import init_parallel
    from scope_megatron.trainer.checkpointing import load_checkpoint

    init_parallel(1, 1)
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    model = build_gpt_model(arch, perform_initialization=False)
    _, optimizer, scheduler = wrap_for_training(model, lr=1e-3)
    state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    steps = {float(st["step"]) for opt in inner for st in opt.state.values()}
    return {"step": state["step"], "sampler": state.get("sampler"), "adam_steps": steps,
            "weights": {n: t.clone() for n, t in export_hf_tensors(model, arch)}}
