"""Restart against servers that outlived the trainer (servers stay up, ``checkpoint.resume=latest``).

Student and teacher are long-lived ``scope-megatron serve`` processes. A first run trains 2
steps against them; a second, resumed run is SIGKILLed in the middle of its weight update (the
student is left paused, with a weight-update session open and the dead run's broadcast group
alive); a third, resumed run must clean the student up, reconnect, sync, train step 3 and pass
the sync probe, in well under the 600 s readiness wait it used to hang in.

The kill lands mid-update deterministically through ``SCOPE_MEGATRON_TEST_STALL_FILE``
(:func:`scope_megatron.rollout.weight_transfer._test_stall_after_first_bucket`): the trainer
touches the file after the first bucket was received and then sleeps until killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from scope_megatron.rollout.embedded_server import start_embedded_server_process
from tests.dist_utils import free_port
from tests.loop_utils import REPO, asset_overrides, loop_env, read_metrics, run_train, tail, train_cmd

pytestmark = pytest.mark.timeout(900)



@pytest.fixture(scope="module")
def servers(assets, tmp_path_factory):
    """Student and teacher engine processes, as a user would leave them running."""
    logs = tmp_path_factory.mktemp("servers")
    args = ["--dtype", "float32", "--random-seed", "1234", "--max-batch-size", "4", "--log-level", "warning",
            "--enable-deterministic-inference"]

    def start(role: str):
        return start_embedded_server_process(assets[role], port=free_port(), extra_args=args,
                                             log_path=logs / f"{role}.log", ready_timeout=300,
                                             env={"OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(2) as pool:
        student, teacher = pool.map(start, ("student", "teacher"))
    try:
        yield student, teacher
    finally:
        student.stop()
        teacher.stop()


def test_resume_after_a_kill_mid_weight_update(assets, servers, tmp_path):
    student, teacher = servers
    run_dir = tmp_path / "run"
    common = [*asset_overrides(assets, run_dir), f"rollout.student_urls=[{student.url}]",
              f"teacher.urls=[{teacher.url}]", "checkpoint.every=1", "checkpoint.keep_last=0"]

    first = run_train(*common, "steps=2", timeout=400)
    assert first.returncode == 0, tail(first)
    assert sorted(read_metrics(run_dir)) == [1, 2]

    # the resumed run stalls inside its first weight update and is killed there
    stall = tmp_path / "stalled"
    proc = subprocess.Popen(train_cmd(*common, "steps=3", "checkpoint.resume=latest"), cwd=REPO,
                            env={**loop_env(), "SCOPE_MEGATRON_TEST_STALL_FILE": str(stall)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not stall.exists():
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "the resumed run did not reach its weight update within 300 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # what the dead trainer left on the student: a pause, an open session, its group
    assert httpx.get(student.url + "/ready").status_code == 503
    record = json.loads((run_dir / "weight_update_group.json").read_text())
    assert record["group_name"].startswith("weight_update_group_") and record["engines"] == [student.url]
    assert sorted(read_metrics(run_dir)) == [1, 2]

    t0 = time.monotonic()
    third = run_train(*common, "steps=3", "checkpoint.resume=latest", timeout=400)
    seconds = time.monotonic() - t0
    assert third.returncode == 0, tail(third)
    assert "resumed from" in third.stderr
    assert seconds < 300, f"the restarted run took {seconds:.0f} s"
    assert sorted(read_metrics(run_dir)) == [1, 2, 3]
    # the dead run's group was destroyed on the student, which serves the step-3 weights and runs
    assert f"destroy_weights_update_group({record['group_name']}): done" in third.stderr
    gone = httpx.post(student.url + "/destroy_weights_update_group", json={"group_name": record["group_name"]})
    assert gone.status_code == 400 and "does not exist" in gone.json()["message"]
    assert httpx.get(student.url + "/model_info").json()["weight_version"] == "3"
    assert httpx.get(student.url + "/ready").status_code == 200
    assert not (run_dir / "weight_update_group.json").exists()  # closed cleanly this time
    # the probe check passed after the restart's first sync (step 2's weights) and after step 3
    probes = [json.loads(line) for line in (run_dir / "sync_probe.jsonl").read_text().splitlines()]
    restarted = [p for p in probes if p["step"] in (2, 3)][-2:]
    assert [p["step"] for p in restarted] == [2, 3], [p["step"] for p in probes]
    assert all(p["max_abs_diff"] <= 1e-3 for p in restarted), [p["max_abs_diff"] for p in restarted]
