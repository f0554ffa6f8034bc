"""The launcher: subprocess servers per role, readiness, logs in the run dir, stop on exit or failure."""

from __future__ import annotations

import os

import httpx
import pytest

from scope_megatron.rollout.launcher import (RolloutServers, ServerGroupSpec, external_endpoints, router_command,
                                             server_command)
from scope_megatron.tiny_models import save_tiny_hf_model

pytestmark = pytest.mark.timeout(150)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_commands():
    spec = ServerGroupSpec(role="teacher", model_path="/m", tp_size=2, extra_args=["--mem-fraction-static", "0.8"])
    assert server_command(spec, "127.0.0.1", 30000, 29000, python="py", api_key="k") == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1", "--port", "30000",
        "--tp-size", "2", "--nccl-port", "29000", "--api-key", "k", "--mem-fraction-static", "0.8"]
    assert router_command(["http://a:1", "http://b:2"], "0.0.0.0", 8000, python="py") == [
        "py", "-m", "sglang_router.launch_router", "--worker-urls", "http://a:1", "http://b:2", "--policy",
        "cache_aware", "--host", "0.0.0.0", "--port", "8000"]
    with pytest.raises(ValueError, match="tensor parallelism"):
        server_command(ServerGroupSpec(role="s", model_path="/m", tp_size=2, engine="embedded"), "h", 1, 2)
    ext = external_endpoints("student", ["http://n1:30000/", "http://n2:30000"], router_url="http://r:8000")
    assert ext.url == "http://r:8000" and ext.worker_urls == ["http://n1:30000", "http://n2:30000"]
    with pytest.raises(ValueError, match="router_url"):
        external_endpoints("student", ["http://n1:1", "http://n2:2"])


def test_launch_student_and_teacher_then_stop(tmp_path):
    student = save_tiny_hf_model(tmp_path / "student", seed=1)
    teacher = save_tiny_hf_model(tmp_path / "teacher", seed=2)
    servers = RolloutServers(run_dir=tmp_path / "run", ready_timeout_s=120, groups=[
        ServerGroupSpec(role="student", model_path=str(student), engine="embedded"),
        ServerGroupSpec(role="teacher", model_path=str(teacher), engine="embedded",
                        extra_args=["--weight-version", "teacher-v0"])])
    with servers as endpoints:
        pids = dict(servers.pids)
        assert set(endpoints) == {"student", "teacher"}
        info = httpx.get(endpoints["teacher"].url + "/model_info").json()
        assert info["weight_version"] == "teacher-v0" and info["model_path"] == str(teacher)
        r = httpx.post(endpoints["student"].url + "/generate",
                       json={"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}, timeout=30)
        assert r.status_code == 200
        assert all(_alive(p) for p in pids.values())
    assert not any(_alive(p) for p in pids.values())
    logs = sorted(p.name for p in (tmp_path / "run" / "logs").iterdir())
    assert logs == ["student-0.log", "teacher-0.log"]
    assert "listening on" in (tmp_path / "run" / "logs" / "student-0.log").read_text()


def test_failed_server_stops_everything_and_reports_its_log(tmp_path, monkeypatch):
    good = save_tiny_hf_model(tmp_path / "good", seed=1)
    spawned = []
    original = RolloutServers._spawn

    def recording_spawn(self, *args, **kwargs):
        proc = original(self, *args, **kwargs)
        spawned.append(proc.popen)
        return proc
    monkeypatch.setattr(RolloutServers, "_spawn", recording_spawn)
    servers = RolloutServers(run_dir=tmp_path / "run", ready_timeout_s=120, groups=[
        ServerGroupSpec(role="student", model_path=str(good), engine="embedded"),
        ServerGroupSpec(role="teacher", model_path=str(tmp_path / "missing"), engine="embedded")])
    with pytest.raises(RuntimeError, match=r"teacher-0 exited with code \d+ before becoming healthy") as info:
        servers.start()
    assert "missing" in str(info.value)  # the log tail names the bad path
    assert servers.pids == {}
    assert len(spawned) == 2 and all(p.poll() is not None for p in spawned)  # the healthy student was stopped too
