"""A colocated student server that outlived its trainer while its memory was released.

The embedded engine follows SGLang 0.5.23 here (rollout/engine/weights.py cites the lines): a
generation on released memory, ``/health``'s probe included, kills the server, and resuming
memory that is not released kills it too. The trainer records the engines it released
(``RUN_DIR/engines_released.json``) and a new trainer resumes them before anything reaches them:

- a released server and the record a trainer killed during training leaves: the next trainer
  resumes the server, pushes its weights in memory, passes the probe check and trains;
- a record whose weight version the server no longer reports (it was restarted) is left alone:
  the server is not resumed (a resume would kill a server that is not released).
"""

from __future__ import annotations

import json

import httpx
import pytest

from scope_megatron.parallel import free_port
from scope_megatron.rollout.embedded_server import start_embedded_server_process
from scope_megatron.rollout.weight_transfer import resume_released_engines
from scope_megatron.trainer.weight_sync import released_engines_record
from tests.loop_utils import asset_overrides, read_metrics, run_train, tail

pytestmark = pytest.mark.timeout(400)


@pytest.fixture()
def released_server(tmp_path):
    from scope_megatron.examples.tiny import prepare

    assets = prepare(tmp_path / "tiny")
    handle = start_embedded_server_process(assets["student"], free_port(), log_path=tmp_path / "student.log",
                                           extra_args=["--enable-memory-saver", "--weight-version", "7",
                                                       "--enable-deterministic-inference"])
    try:
        httpx.post(handle.url + "/release_memory_occupation", json={"tags": None}, timeout=30).raise_for_status()
        yield assets, handle
    finally:
        handle.stop()


def _record(run_dir, url: str, version: str):
    record = released_engines_record(run_dir)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"engines": {url: version}, "tags": None}))
    return record


def test_a_new_trainer_resumes_the_released_server_and_trains(released_server, tmp_path):
    assets, handle = released_server
    run_dir = tmp_path / "run"
    record = _record(run_dir, handle.url, "7")  # as the killed trainer left it
    proc = run_train(*asset_overrides(assets, run_dir), "placement=colocated", f"rollout.student_urls=[{handle.url}]",
                     "steps=1", "checkpoint.every=0", "checkpoint.save_at_end=false", timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert "released by the previous trainer, resumed" in proc.stderr
    assert handle.process.poll() is None  # the server lived through it
    metrics = read_metrics(run_dir)[1]
    assert metrics["sync/probe_mean_abs_diff"] <= 1e-3 and metrics["time/colocation"] > 0
    assert not record.exists()  # the run ended with the engine resumed


def test_a_restarted_server_is_left_alone(released_server, tmp_path):
    _, handle = released_server
    record = _record(tmp_path / "run", handle.url, "3")  # the server now reports version 7
    lines = resume_released_engines(record, [handle.url])
    assert len(lines) == 1 and "left as it is" in lines[0] and not record.exists()
    assert handle.process.poll() is None
    # still released: this trainer's own resume is what brings it back
    httpx.post(handle.url + "/resume_memory_occupation", json={"tags": None}, timeout=30).raise_for_status()
    assert httpx.get(handle.url + "/model_info", timeout=30).json()["weight_version"] == "7"
