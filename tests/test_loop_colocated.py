"""``placement: colocated`` end to end at TP=2 (two gloo ranks, an embedded student engine with
the memory saver, weights pushed in memory with ``update_weights_from_tensor``):

- the same losses and gradient norms as the separate layout with the same seed, step for step;
- the probe check passes after every in-memory sync (the engine serves exactly the trained
  weights, although its weights were released and resumed in between), and the memory phases are
  logged;
- killing the student engine aborts clearly and leaves the last checkpoint loadable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from scope_megatron.trainer.checkpointing import checkpoint_is_loadable, list_checkpoints
from tests.loop_utils import REPO, asset_overrides, loop_env, read_metrics, train_cmd

pytestmark = pytest.mark.timeout(600)
STEPS = 3
# engines decode one request at a time: their log-probs do not depend on batch composition
COMMON = [f"steps={STEPS}", "parallel.tp=2", "rollout.embedded_max_batch_size=1", "teacher.embedded_max_batch_size=1",
          "checkpoint.every=1", "checkpoint.keep_last=0"]
SAME = ("loss/total", "loss/mle", "loss/kl", "train/grad_norm", "reward/accuracy", "kl/sampled_k1",
        "objective/ppl/student_mean", "train/loss_tokens")



@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("colocated")
    specs = {"colocated": ["placement=colocated"], "separate": []}
    procs = {name: subprocess.Popen(train_cmd(*asset_overrides(assets, root / name), *COMMON, *extra, nproc=2),
                                    cwd=REPO, env=loop_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in specs.items()}
    logs = {}
    for name, p in procs.items():
        _, logs[name] = p.communicate(timeout=540)
        assert p.returncode == 0, f"{name}: rc={p.returncode}\n{logs[name][-4000:]}"
    return {name: (root / name, logs[name]) for name in specs}


def test_colocated_equals_separate_and_every_sync_checks_out(runs):
    colocated, separate = read_metrics(runs["colocated"][0]), read_metrics(runs["separate"][0])
    assert sorted(colocated) == sorted(separate) == list(range(1, STEPS + 1))
    for step in colocated:
        for key in SAME:
            assert colocated[step][key] == pytest.approx(separate[step][key], rel=1e-6, abs=1e-7), (step, key)
        c = colocated[step]
        assert c["sync/probe_mean_abs_diff"] <= 1e-3, c  # fp32 tolerance: the engine holds the new weights
        assert c["sync/bytes"] > 0 and c["time/colocation"] >= 0
        for key in ("memory/engines_released_gib", "memory/trainer_loaded_gib", "memory/trainer_trained_gib",
                    "memory/trainer_offloaded_gib"):
            assert c[key] > 0, key
        assert "memory/trainer_loaded_gib" not in separate[step]
    # every update went in memory, and the separate layout's over the broadcast group
    for step in range(1, STEPS + 1):
        assert f"weight update {step}: " in runs["colocated"][1] and f"weight update {step}: " in runs["separate"][1]
    assert runs["colocated"][1].count("(tensor)") == STEPS and "(distributed)" not in runs["colocated"][1]
    assert runs["separate"][1].count("(distributed)") == STEPS


def test_killed_engine_in_colocated_mode_aborts_and_checkpoint_survives(assets, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = train_cmd(*asset_overrides(assets, run_dir), *COMMON, "steps=50", "placement=colocated",
                    "rollout.max_retries=1", "rollout.request_timeout_s=20", nproc=2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=loop_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(run_dir / "checkpoints") or list_checkpoints(run_dir / "checkpoints")[-1][0] < 1:
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.1)
        os.kill(int((run_dir / "engines" / "student.pid").read_text()), signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-4000:]
    aborted = [line for line in err.splitlines() if "ABORTED" in line]
    assert aborted and ("student engine" in aborted[0] or "colocated" in aborted[0] or "weight sync" in aborted[0]), \
        err[-4000:]
    step, latest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert step >= 1 and checkpoint_is_loadable(latest), (step, latest)
