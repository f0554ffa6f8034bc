"""The launcher: subprocess servers per role, readiness, logs in the run dir, stop on exit or failure;
every argv it builds for ``sglang.launch_server`` / ``sglang_router.launch_router`` is parsed by
SGLang 0.5.23's and sglang-router 0.3.2's own parsers (tests/sglang_parsers.py)."""

from __future__ import annotations

import os

import httpx
import pytest

from scope_megatron.rollout.launcher import (Endpoints, RolloutServers, ServerGroupSpec, ServersEnvError,
                                             external_endpoints, router_command, router_command_for, server_command,
                                             server_groups_from_env, servers_env_lines)
from scope_megatron.examples.tiny_models import save_tiny_hf_model
from tests import sglang_parsers

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
    seeded = ServerGroupSpec(role="student", model_path="/s", deterministic=True)
    assert server_command(seeded, "h", 1, 2, python="py")[-1] == "--enable-deterministic-inference"
    assert "--enable-deterministic-inference" in server_command(
        ServerGroupSpec(role="student", model_path="/s", deterministic=True, engine="embedded"), "h", 1, 2)
    assert "--enable-deterministic-inference" not in server_command(spec, "h", 1, 2)
    student = ServerGroupSpec(role="student", model_path="/s", router_health_check_timeout_s=30,
                              router_health_failure_threshold=40)
    assert router_command_for(student, ["http://a:1"], "h", 8000, python="py")[-4:] == [
        "--health-check-timeout-secs", "30", "--health-failure-threshold", "40"]
    with pytest.raises(ValueError, match="health-failure-threshold must be >= 1"):
        router_command(["http://a:1"], "h", 1, health_failure_threshold=0)
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


def test_server_groups_from_env_defaults_and_errors():
    student, teacher = server_groups_from_env({"STUDENT": "/s", "TEACHER": "/t"})
    assert (student.role, student.gpu_ids, student.base_port, student.engine, student.deterministic) == \
        ("student", [0], 30000, "sglang", True)
    assert (student.router_health_check_timeout_s, student.router_health_failure_threshold) == (30, 30)
    assert (teacher.role, teacher.gpu_ids, teacher.tp_size, teacher.num_replicas, list(teacher.extra_args)) == \
        ("teacher", [1], 1, 1, [])
    student, teacher = server_groups_from_env({"STUDENT": "/s", "TEACHER": "/t", "STUDENT_GPUS": "0,1",
                                               "TEACHER_GPUS": "2,3,4,5", "TEACHER_TP": "2", "SEEDED": "0",
                                               "EXTRA_TEACHER_ARGS": "--mem-fraction-static 0.8"})
    assert (student.num_replicas, student.deterministic, teacher.num_replicas) == (2, False, 2)
    assert list(teacher.extra_args) == ["--mem-fraction-static", "0.8"]
    for env, message in [({"STUDENT": ""}, "set STUDENT"), ({"TEACHER_GPUS": "0"}, "overlap"),
                         ({"TEACHER_GPUS": "1,2,3", "TEACHER_TP": "2"}, "TEACHER_TP=2"),
                         ({"STUDENT_GPUS": "0,x"}, "STUDENT_GPUS='0,x' is not a comma-separated list"),
                         ({"SEEDED": "yes"}, "SEEDED must be 0 or 1"), ({"ENGINE": "vllm"}, "ENGINE must be"),
                         ({"ROUTER_HEALTH_FAILURES": "0"}, "ROUTER_HEALTH_FAILURES='0' must be >= 1"),
                         ({"COLOCATE": "yes"}, "COLOCATE must be 0 or 1"),
                         ({"COLOCATE": "1", "STUDENT_MEM_FRACTION": "1.5"}, "STUDENT_MEM_FRACTION='1.5'"),
                         ({"COLOCATE": "1", "ENGINE": "embedded", "STUDENT_GPUS": "0,2"}, "no tensor parallelism")]:
        with pytest.raises(ServersEnvError, match=message):
            server_groups_from_env({"STUDENT": "/s", "TEACHER": "/t", **env})
    # colocated: one student server over all its GPUs (the trainer's), with the memory saver
    student, _ = server_groups_from_env({"STUDENT": "/s", "TEACHER": "/t", "COLOCATE": "1", "STUDENT_GPUS": "0,1,2,3",
                                         "TEACHER_GPUS": "4", "EXTRA_STUDENT_ARGS": "--disable-radix-cache"})
    assert (student.num_replicas, student.tp_size, student.gpu_ids) == (1, 4, [0, 1, 2, 3])
    assert list(student.extra_args) == ["--enable-memory-saver", "--mem-fraction-static", "0.5",
                                        "--disable-radix-cache"]
    embedded, _ = server_groups_from_env({"STUDENT": "/s", "TEACHER": "/t", "COLOCATE": "1", "ENGINE": "embedded"})
    assert list(embedded.extra_args) == ["--enable-memory-saver"]  # no --mem-fraction-static: not its flag
    # one role only (the Slurm script's colocated layout): the other's model and GPUs do not matter
    (teacher,) = server_groups_from_env({"TEACHER": "/t", "ROLES": "teacher", "TEACHER_GPUS": "0,1"})
    assert (teacher.role, teacher.num_replicas) == ("teacher", 2)
    (student,) = server_groups_from_env({"STUDENT": "/s", "ROLES": "student", "COLOCATE": "1", "STUDENT_GPUS": "0,1"})
    assert (student.role, student.tp_size) == ("student", 2)
    for env, message in [({"ROLES": "student,critic"}, "ROLES='student,critic'"), ({"ROLES": ""}, "ROLES=''"),
                         ({"ROLES": "teacher", "TEACHER": ""}, "set TEACHER")]:
        with pytest.raises(ServersEnvError, match=message):
            server_groups_from_env({"STUDENT": "/s", "TEACHER": "/t", **env})
    only_teacher = servers_env_lines({"teacher": Endpoints("teacher", "http://t:1", ["http://t:1"])}, [teacher])
    assert [line.split("=")[0] for line in only_teacher][:2] == ["TEACHER_URLS", "TEACHER_ROUTER"]
    assert not any(line.startswith("STUDENT_") for line in only_teacher)


# ---- the argv against SGLang's own parsers --------------------------------------------------------

def _server_argvs() -> dict[str, list[str]]:
    """Every kind of sglang.launch_server argv the launcher builds (and one it must never build)."""
    base = {"STUDENT": "/models/student", "TEACHER": "/models/teacher"}
    student, teacher = server_groups_from_env(base)  # launch/sglang_servers.sh's defaults
    unseeded, _ = server_groups_from_env({**base, "SEEDED": "0"})
    _, teacher_tp = server_groups_from_env({**base, "STUDENT_GPUS": "0,1", "TEACHER_GPUS": "2,3", "TEACHER_TP": "2",
                                            "EXTRA_TEACHER_ARGS": "--mem-fraction-static 0.8 --disable-radix-cache"})
    colocated, _ = server_groups_from_env({**base, "COLOCATE": "1", "STUDENT_GPUS": "0,1", "TEACHER_GPUS": "2",
                                           "STUDENT_MEM_FRACTION": "0.4"})
    wrong = ServerGroupSpec(role="teacher", model_path="/models/teacher", extra_args=["--enable-prefix-caching"])
    return {
        "student_seeded": server_command(student, "127.0.0.1", 30000, 29001, python="python"),
        "student_unseeded": server_command(unseeded, "node0", 30001, 29002, python="python"),
        "teacher_default": server_command(teacher, "127.0.0.1", 30100, 29003, python="python"),
        "teacher_tp_extra": server_command(teacher_tp, "10.0.0.5", 30100, 29004, python="python", api_key="sekret"),
        "student_colocated": server_command(colocated, "127.0.0.1", 30000, 29006, python="python"),
        "wrong_vllm_flag": server_command(wrong, "127.0.0.1", 30100, 29005, python="python"),
    }


def _router_argvs() -> dict[str, list[str]]:
    student, teacher = server_groups_from_env({"STUDENT": "/s", "TEACHER": "/t", "STUDENT_GPUS": "0,1",
                                               "TEACHER_GPUS": "2,3"})
    workers = ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    return {
        "student": router_command_for(student, workers, "127.0.0.1", 8000, python="python"),
        "teacher": router_command_for(teacher, workers, "0.0.0.0", 8001, python="python"),
        "wrong_flag_name": router_command(workers, "127.0.0.1", 8002, python="python") +
        ["--health-check-timeout-seconds", "30"],
    }


def _parsed(kind: str, argvs: dict[str, list[str]], tmp_path_factory) -> dict[str, dict]:
    wheel = sglang_parsers.sglang_wheel() if kind == "server" else sglang_parsers.router_wheel()
    if wheel is None:
        pytest.skip(f"the {'sglang 0.5.23' if kind == 'server' else 'sglang-router 0.3.2'} wheel is not in "
                    f"{sglang_parsers.WHEELS} (scripts/setup.sh downloads it)")
    results = sglang_parsers.parse_commands(list(argvs.values()), wheel, tmp_path_factory.mktemp(f"{kind}_parser"))
    return dict(zip(argvs, results))


@pytest.fixture(scope="module")
def server_parsed(tmp_path_factory):
    return _parsed("server", _server_argvs(), tmp_path_factory)


@pytest.fixture(scope="module")
def router_parsed(tmp_path_factory):
    return _parsed("router", _router_argvs(), tmp_path_factory)


@pytest.mark.timeout(400)
def test_sglang_0_5_23_parses_every_server_argv(server_parsed):
    for name, result in server_parsed.items():
        if name != "wrong_vllm_flag":
            assert result["ok"], f"{name}: {result['error']}"
    v = {name: r["values"] for name, r in server_parsed.items()}
    assert (v["student_seeded"]["model_path"], v["student_seeded"]["host"], v["student_seeded"]["port"],
            v["student_seeded"]["nccl_port"], v["student_seeded"]["tp_size"]) == ("/models/student", "127.0.0.1",
                                                                                  30000, 29001, 1)
    assert v["student_seeded"]["enable_deterministic_inference"] is True
    assert v["student_unseeded"]["enable_deterministic_inference"] is False
    assert v["teacher_default"]["enable_deterministic_inference"] is False
    assert v["teacher_default"]["disable_radix_cache"] is False  # SGLang's prefix cache: on by default
    t = v["teacher_tp_extra"]
    assert (t["tp_size"], t["host"], t["api_key"], t["mem_fraction_static"], t["disable_radix_cache"]) == \
        (2, "10.0.0.5", "sekret", 0.8, True)
    c = v["student_colocated"]
    assert (c["tp_size"], c["enable_memory_saver"], c["mem_fraction_static"]) == (2, True, 0.4)
    # the parser is strict: vLLM's flag is refused with argparse's usage error
    wrong = server_parsed["wrong_vllm_flag"]
    assert not wrong["ok"] and wrong["exit_code"] == 2
    assert "unrecognized arguments: --enable-prefix-caching" in wrong["error"]


@pytest.mark.timeout(300)
def test_sglang_router_0_3_2_parses_every_router_argv(router_parsed):
    student, teacher, wrong = router_parsed["student"], router_parsed["teacher"], router_parsed["wrong_flag_name"]
    assert student["ok"] and teacher["ok"], (student["error"], teacher["error"])
    s, t = student["values"], teacher["values"]
    assert s["worker_urls"] == ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    assert (s["policy"], s["host"], s["port"]) == ("cache_aware", "127.0.0.1", 8000)
    # the student router outlasts a weight update; sglang-router's defaults: 5 s timeout, 3 failures, 60 s
    assert (s["health_check_timeout_secs"], s["health_failure_threshold"], s["health_check_interval_secs"]) == \
        (30, 30, 60)
    assert (t["health_check_timeout_secs"], t["health_failure_threshold"]) == (5, 3)
    assert not wrong["ok"] and wrong["exit_code"] == 2
    assert "unrecognized arguments: --health-check-timeout-seconds" in wrong["error"]
