"""The launch scripts, run as processes the way users run them (CPU, embedded engines, tiny models).

- ``launch/sglang_servers.sh`` (ENGINE=embedded) brings a student and a teacher server up and
  writes ``servers.env``; ``launch/train.sh`` (SERVERS_ENV) and ``launch/train_multinode.sh``
  (NNODES=1, static rendezvous) each train against them; SIGTERM to the server script stops
  every server process. With ``COLOCATE=1`` the student server shares the trainer's devices and
  ``launch/train.sh`` trains a colocated step against it (release, train, resume, in-memory sync).
- ``launch/train.sh`` gives the trainer only the GPUs the servers do not hold (an ``nvidia-smi``
  stand-in lists 8 GPUs; ``DRY_RUN=1`` prints the torchrun command) and refuses overlaps;
  ``launch/train_multinode.sh`` uses torchrun's static rendezvous (node ranks as given).
- ``launch/slurm/scope.sbatch`` with local stand-ins for ``srun`` and ``scontrol`` (two "nodes",
  127.0.0.1 serving and 127.0.0.2 training, both this machine): it trains, USR1 (Slurm's
  ``--signal=B:USR1@...``) makes it create ``RUN_DIR/STOP``, every srun has
  ``--kill-on-bad-exit=1``, it exits 0 and the servers are stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scope_megatron.parallel import free_port
from tests.loop_utils import REPO, TINY_CONFIG, asset_overrides, loop_env, read_metrics

pytestmark = pytest.mark.timeout(500)
SERVERS_SH = REPO / "launch" / "sglang_servers.sh"
TRAIN_SH = REPO / "launch" / "train.sh"
MULTINODE_SH = REPO / "launch" / "train_multinode.sh"
SBATCH = REPO / "launch" / "slurm" / "scope.sbatch"
SHORT = ("steps=1", "checkpoint.every=1")  # one step (weight sync, rollouts, scoring, update, checkpoint)


# the scripts' own variables: none comes from the environment the tests run in
LAUNCH_VARIABLES = ("TRAIN_GPUS", "SERVER_GPUS", "SERVERS_ENV", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR",
                    "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "DRY_RUN", "SHUTDOWN_TIMEOUT", "SEEDED", "OUT", "RUN_DIR",
                    "EXTRA_STUDENT_ARGS", "EXTRA_TEACHER_ARGS", "STUDENT_GPUS", "TEACHER_GPUS", "TEACHER_TP", "HOST",
                    "SERVER_HOST", "GPUS_PER_NODE", "COLOCATE", "STUDENT_MEM_FRACTION", "PLACEMENT", "COLOCATED_GPUS",
                    "ROLES")


def _script_env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in loop_env().items() if k not in LAUNCH_VARIABLES}
    return {**base, "PYTHON": sys.executable, **extra}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is not alive
    except FileNotFoundError:
        return False


def _server_pids(text: str) -> dict[str, int]:
    """{name: pid} from the launcher's "started NAME (pid N)" log lines."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", text)}


def _kill_groups(pids) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.5)
    return [p for p in pids if _alive(p)]


def _read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _tail(path: Path, n: int = 5000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"



# ---- GPU split and torchrun arguments (DRY_RUN, no training) ----------------------------------------

@pytest.fixture()
def guarded_python(tmp_path):
    """PYTHON for DRY_RUN checks: the real interpreter, except that starting torchrun fails at once
    (a script that ignored DRY_RUN would otherwise start training)."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ncase \"$*\" in *torch.distributed.run*) echo 'torchrun started (no dry run)' >&2; "
                       f"exit 97;; esac\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture()
def eight_gpus(tmp_path):
    """PATH with an nvidia-smi that lists 8 GPUs (as `nvidia-smi -L` prints them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d}-0000-0000-0000-000000000000)"
                      for i in range(8))
    smi.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 9\ncat <<'EOF'\n{lines}\nEOF\n")
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _dry_run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    assert env["PYTHON"] != sys.executable  # guarded_python
    return subprocess.run(["bash", str(script), "configs/tiny_cpu.yaml", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**_script_env(DRY_RUN="1"), **env})


def _printed_command(proc: subprocess.CompletedProcess) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, argv) of the command a DRY_RUN printed."""
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout.strip().splitlines()[-1])
    assignments = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):
        name, value = words.pop(0).split("=", 1)
        assignments[name] = value
    return assignments, words


def _write_servers_env(path: Path, gpus: str, hostname: str, colocated_gpus: str = "") -> Path:
    placement = "colocated" if colocated_gpus else "separate"
    path.write_text(f"STUDENT_URLS=[http://n:1]\nSTUDENT_ROUTER=http://n:1\nTEACHER_URLS=[http://n:2]\n"
                    f"TEACHER_ROUTER=http://n:2\nSERVER_GPUS={gpus}\nSERVER_HOSTNAME={hostname}\n"
                    f"PLACEMENT={placement}\nCOLOCATED_GPUS={colocated_gpus}\n")
    return path


def test_train_sh_takes_only_the_gpus_the_servers_do_not_use(eight_gpus, guarded_python, tmp_path):
    import socket

    here = _write_servers_env(tmp_path / "here.env", "0,1", socket.gethostname())
    elsewhere = _write_servers_env(tmp_path / "elsewhere.env", "0,1", "some-other-node")
    gpu8 = {"PATH": eight_gpus, "PYTHON": guarded_python}

    env, argv = _printed_command(_dry_run(TRAIN_SH, {**gpu8, "SERVERS_ENV": str(here)}))
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3,4,5,6,7" and "--nproc_per_node=6" in argv
    assert "rollout.student_urls=[http://n:1]" in argv and "teacher.router_url=http://n:2" in argv

    # NPROC below the free GPUs takes the first ones; servers on another machine leave all 8
    env, argv = _printed_command(_dry_run(TRAIN_SH, {**gpu8, "SERVERS_ENV": str(here), "NPROC": "4"}))
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3,4,5" and "--nproc_per_node=4" in argv
    env, argv = _printed_command(_dry_run(TRAIN_SH, {**gpu8, "SERVERS_ENV": str(elsewhere)}))
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and "--nproc_per_node=8" in argv
    # explicit TRAIN_GPUS, and SERVER_GPUS given directly (servers started by other means)
    env, argv = _printed_command(_dry_run(TRAIN_SH, {**gpu8, "TRAIN_GPUS": "4,5,6,7",
                                                     "SERVER_GPUS": "0,1,2,3"}))
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and "--nproc_per_node=4" in argv
    env, argv = _printed_command(_dry_run(TRAIN_SH, {**gpu8, "SERVER_GPUS": "0,1,2,3"}))
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"

    for extra, message in [({"SERVERS_ENV": str(here), "TRAIN_GPUS": "1,2"},
                            "TRAIN_GPUS=1,2 overlaps the servers' GPUs SERVER_GPUS=0,1 (GPU 1)"),
                           ({"SERVERS_ENV": str(here), "NPROC": "7"}, "NPROC=7 ranks but only 6 GPUs"),
                           ({"SERVER_GPUS": "0,1,2,3,4,5,6,7"}, "none left to train on"),
                           ({"TRAIN_GPUS": "2,x"}, "TRAIN_GPUS=2,x is not a comma-separated list"),
                           ({"SERVERS_ENV": str(tmp_path / "missing.env")}, "does not exist")]:
        proc = _dry_run(TRAIN_SH, {**gpu8, **extra})
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)
        assert proc.stdout == ""


def test_train_sh_trains_on_the_colocated_students_gpus(eight_gpus, guarded_python, tmp_path):
    import socket

    here = _write_servers_env(tmp_path / "here.env", "4", socket.gethostname(), colocated_gpus="0,1,2,3")
    elsewhere = _write_servers_env(tmp_path / "elsewhere.env", "4", "some-other-node", colocated_gpus="0,1,2,3")
    gpu8 = {"PATH": eight_gpus, "PYTHON": guarded_python}
    env, argv = _printed_command(_dry_run(TRAIN_SH, {**gpu8, "SERVERS_ENV": str(here)}))
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and "--nproc_per_node=4" in argv and "placement=colocated" in argv
    env, argv = _printed_command(_dry_run(TRAIN_SH, {**gpu8, "SERVERS_ENV": str(here), "TRAIN_GPUS": "0, 1,2,3"}))
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    for extra, message in [({"SERVERS_ENV": str(here), "TRAIN_GPUS": "4,5,6,7"},
                            "the colocated student server runs on GPUs 0,1,2,3"),
                           ({"SERVERS_ENV": str(elsewhere)}, "runs on some-other-node, so the trainer must too")]:
        proc = _dry_run(TRAIN_SH, {**gpu8, **extra})
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)


def test_train_sh_without_gpus_runs_one_rank(guarded_python):
    path = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists())
    env, argv = _printed_command(_dry_run(TRAIN_SH, {"PATH": path, "PYTHON": guarded_python}))
    assert "CUDA_VISIBLE_DEVICES" not in env and "--nproc_per_node=1" in argv and "--standalone" in argv


def test_train_multinode_sh_uses_the_static_rendezvous(guarded_python):
    py = {"PYTHON": guarded_python}
    env, argv = _printed_command(_dry_run(MULTINODE_SH, {**py, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node7",
                                                         "MASTER_PORT": "29555", "NPROC": "8"}, "steps=2"))
    assert argv[:3] == [guarded_python, "-m", "torch.distributed.run"]
    head = argv[3:argv.index("-m", 3)]
    assert {"--nnodes=2", "--node-rank=1", "--nproc_per_node=8", "--rdzv-backend=static", "--master-addr=node7",
            "--master-port=29555"} <= set(head)
    assert not [a for a in head if a.startswith(("--rdzv-endpoint", "--rdzv-id", "--standalone"))]
    # the installed torchrun has --shutdown-timeout: SIGTERM -> the ranks get SHUTDOWN_TIMEOUT, not 30 s
    assert "--shutdown-timeout=900" in head
    assert argv[argv.index("-m", 3):] == ["-m", "scope_megatron.train", "--config", "configs/tiny_cpu.yaml",
                                          "steps=2"]
    _, argv = _printed_command(_dry_run(MULTINODE_SH, {**py, "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "a",
                                                       "SHUTDOWN_TIMEOUT": "1200"}))
    assert "--shutdown-timeout=1200" in argv
    for extra, message in [({"NODE_RANK": "2"}, "NODE_RANK=2 is not in 0..1"),
                           ({"SHUTDOWN_TIMEOUT": "soon"}, "SHUTDOWN_TIMEOUT=soon is not a number")]:
        proc = _dry_run(MULTINODE_SH, {**py, "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "a", **extra})
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ---- servers + training through the scripts ---------------------------------------------------------

class Servers:
    """``launch/sglang_servers.sh`` running in the background."""

    def __init__(self, out_dir: Path, assets: dict[str, Path], **extra: str) -> None:
        self.out_dir = out_dir
        self.log = out_dir.parent / "sglang_servers.out"
        self.env = _script_env(STUDENT=str(assets["student"]), TEACHER=str(assets["teacher"]), ENGINE="embedded",
                               STUDENT_PORT=str(free_port()), TEACHER_PORT=str(free_port()), **extra)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(["bash", str(SERVERS_SH), str(out_dir)], cwd=REPO, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        env_file = self.out_dir / "servers.env"
        while not env_file.exists():
            assert self.proc.poll() is None, f"sglang_servers.sh exited {self.proc.returncode}:\n{_tail(self.log)}"
            assert time.monotonic() < deadline, f"no servers.env after {timeout} s:\n{_tail(self.log)}"
            time.sleep(0.5)
        return _read_env_file(env_file)

    @property
    def pids(self) -> dict[str, int]:
        return _server_pids(self.log.read_text())

    def stop(self) -> None:
        """SIGTERM to the script (it stops its servers), then SIGKILL to whatever is left."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _kill_groups([self.proc.pid])
        _kill_groups(self.pids.values())


@pytest.fixture(scope="module")
def servers(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    handle = Servers(root / "servers", assets)
    try:
        handle.urls = handle.wait_ready(timeout=300)
        yield handle
    finally:
        handle.stop()


def test_servers_come_up_and_write_servers_env(servers, assets):
    urls = servers.urls
    assert set(urls) == {"STUDENT_URLS", "STUDENT_ROUTER", "TEACHER_URLS", "TEACHER_ROUTER", "SERVER_GPUS",
                         "SERVER_HOSTNAME", "PLACEMENT", "COLOCATED_GPUS"}
    assert urls["STUDENT_URLS"] == f"[{urls['STUDENT_ROUTER']}]" and urls["SERVER_GPUS"] == "0,1"
    assert urls["PLACEMENT"] == "separate" and urls["COLOCATED_GPUS"] == ""
    for role in ("STUDENT", "TEACHER"):
        assert httpx.get(urls[f"{role}_ROUTER"] + "/health", timeout=30).status_code == 200
    info = httpx.get(urls["STUDENT_ROUTER"] + "/server_info", timeout=30).json()
    assert info["enable_deterministic_inference"] is True  # SEEDED=1 (default): the seeds are honoured
    assert httpx.get(urls["TEACHER_ROUTER"] + "/model_info", timeout=30).json()["model_path"] == str(assets["teacher"])
    assert set(servers.pids) == {"student-0", "teacher-0"}
    first_lines = {p.name: p.read_text().splitlines()[0] for p in (servers.out_dir / "logs").iterdir()}
    assert "--enable-deterministic-inference" in first_lines["student-0.log"]
    assert "--enable-deterministic-inference" not in first_lines["teacher-0.log"]


def _trained_against(run_dir: Path, urls: dict[str, str]) -> None:
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == [1]
    config = (run_dir / "config.yaml").read_text()
    student, teacher = urls["STUDENT_URLS"].strip("[]"), urls["TEACHER_URLS"].strip("[]")
    assert f"- {student}" in config and f"- {teacher}" in config
    assert not (run_dir / "engines").exists()  # no embedded engine of its own: the servers served


def test_train_sh_trains_against_the_servers(servers, assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(["bash", str(TRAIN_SH), str(TINY_CONFIG), *asset_overrides(assets, run_dir), *SHORT],
                          cwd=REPO, capture_output=True, text=True, timeout=450,
                          env=_script_env(SERVERS_ENV=str(servers.out_dir / "servers.env"), NPROC="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    _trained_against(run_dir, servers.urls)


def test_train_multinode_sh_trains_against_the_servers(servers, assets, tmp_path):
    run_dir = tmp_path / "run"
    urls = servers.urls
    proc = subprocess.run(["bash", str(MULTINODE_SH), str(TINY_CONFIG), *asset_overrides(assets, run_dir), *SHORT,
                           f"rollout.student_urls={urls['STUDENT_URLS']}", f"teacher.urls={urls['TEACHER_URLS']}"],
                          cwd=REPO, capture_output=True, text=True, timeout=450,
                          env=_script_env(NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=str(free_port()), NPROC="1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    _trained_against(run_dir, urls)


def test_sigterm_stops_every_server(servers):
    """(Last of the tests that use the shared servers.)"""
    pids = list(servers.pids.values()) + [servers.proc.pid]
    assert all(_alive(p) for p in pids)
    servers.proc.send_signal(signal.SIGTERM)
    assert servers.proc.wait(timeout=60) == 0, _tail(servers.log)
    assert _wait_gone(pids, timeout=30) == [], f"still running: {_wait_gone(pids, 0)}"
    assert not (servers.out_dir / "servers.env").exists()  # the servers are gone, so is their address


def test_colocated_servers_and_train_sh_take_turns_on_the_devices(assets, tmp_path):
    """COLOCATE=1: the student server starts with the memory saver and servers.env says so; train.sh
    then runs a colocated step against it (the engine releases its memory, the trainer trains,
    the engine resumes and gets the weights in memory, the probe check passes)."""
    handle = Servers(tmp_path / "servers", assets, COLOCATE="1")
    try:
        urls = handle.wait_ready(timeout=300)
        assert urls["PLACEMENT"] == "colocated" and urls["COLOCATED_GPUS"] == "0" and urls["SERVER_GPUS"] == "1"
        first_line = (handle.out_dir / "logs" / "student-0.log").read_text().splitlines()[0]
        assert "--enable-memory-saver" in first_line
        run_dir = tmp_path / "run"
        proc = subprocess.run(["bash", str(TRAIN_SH), str(TINY_CONFIG), *asset_overrides(assets, run_dir), *SHORT],
                              cwd=REPO, capture_output=True, text=True, timeout=450,
                              env=_script_env(SERVERS_ENV=str(handle.out_dir / "servers.env")))
        assert proc.returncode == 0, proc.stderr[-5000:]
    finally:
        handle.stop()
    _trained_against(run_dir, urls)
    assert "placement: colocated" in (run_dir / "config.yaml").read_text()
    metrics = read_metrics(run_dir)[1]
    assert metrics["time/colocation"] > 0 and "memory/engines_released_gib" in metrics
    probes = [json.loads(line) for line in (run_dir / "sync_probe.jsonl").read_text().splitlines()]
    assert len(probes) == 2 and all(p["mean_abs_diff"] <= p["tolerance"] for p in probes), probes  # start + step 1


# ---- the Slurm script with local stand-ins ------------------------------------------------------------

SRUN_STANDIN = '''#!{python}
"""srun stand-in: logs its argv, runs the command once per node of -w (here, on this machine) with the
variables srun sets for a task, forwards SIGTERM / SIGINT, exits with the highest task status."""
import json, os, signal, subprocess, sys, time
args = sys.argv[1:]
with open(os.environ["SRUN_STANDIN_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
nodes, kill_on_bad_exit, i = None, False, 0
while i < len(args) and args[i].startswith("-"):
    if args[i] in ("-w", "--nodelist", "-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node"):
        name, value, i = args[i], args[i + 1], i + 2
    else:
        name, _, value = args[i].partition("=")
        i += 1
    if name in ("-w", "--nodelist"):
        nodes = value.split(",")
    kill_on_bad_exit |= name in ("-K", "--kill-on-bad-exit") and value in ("", "1")
command, nodes = args[i:], nodes or ["localhost"]
procs = [subprocess.Popen(command, env={{**os.environ, "SLURM_NODEID": str(r), "SLURM_PROCID": str(r),
                                         "SLURM_LOCALID": "0", "SLURMD_NODENAME": node,
                                         "SLURM_STEP_NUM_NODES": str(len(nodes))}})
         for r, node in enumerate(nodes)]
def forward(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
while any(p.poll() is None for p in procs):
    if kill_on_bad_exit and any(p.poll() not in (None, 0) for p in procs):
        forward(signal.SIGKILL, None)
    time.sleep(0.2)
sys.exit(max(p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs))
'''

SCONTROL_STANDIN = '''#!/bin/sh
# scontrol stand-in: only `scontrol show hostnames LIST` (a comma-separated LIST here)
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: unsupported: $*" >&2; exit 1; }
echo "$3" | tr , '\\n'
'''


def _slurm_job(tmp_path, assets, **extra: str):
    """Stand-ins for srun and scontrol on PATH, and the job's environment: (env, OUT, srun log, batch log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN_STANDIN.format(python=sys.executable))
    (bin_dir / "scontrol").write_text(SCONTROL_STANDIN)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    out, srun_log, log = tmp_path / "job", tmp_path / "srun_calls.jsonl", tmp_path / "batch.out"
    env = _script_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SRUN_STANDIN_LOG=str(srun_log), OUT=str(out),
                      STUDENT=str(assets["student"]), TEACHER=str(assets["teacher"]), ENGINE="embedded",
                      GPUS_PER_NODE="1", MASTER_PORT=str(free_port()), STUDENT_PORT=str(free_port()),
                      TEACHER_PORT=str(free_port()), **extra)
    return env, out, srun_log, log


def _submit(assets, env: dict[str, str], log) -> subprocess.Popen:
    """``bash launch/slurm/scope.sbatch`` (as the batch step runs it) for one step of the tiny config."""
    overrides = [f"model.student={assets['student']}", f"teacher.model={assets['teacher']}",
                 f"data.paths=[{assets['prompts']}]", *SHORT]
    with log.open("w") as sink:
        return subprocess.Popen(["bash", str(SBATCH), str(TINY_CONFIG), *overrides], cwd=REPO, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.timeout(700)
def test_slurm_script_trains_stops_on_usr1_and_stops_the_servers(assets, tmp_path):
    env, out, srun_log, log = _slurm_job(tmp_path, assets, SLURM_JOB_ID="4242", STUDENT_GPUS="0", TEACHER_GPUS="1",
                                         SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2")
    run_dir = out / "run"
    batch = _submit(assets, env, log)
    try:
        # once training runs (the initial weight sync is checked: sync_probe.jsonl), Slurm's
        # pre-signal (#SBATCH --signal=B:USR1@...) reaches the batch script
        deadline = time.monotonic() + 450
        while not (run_dir / "sync_probe.jsonl").exists():
            assert batch.poll() is None, f"scope.sbatch exited {batch.returncode} early:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"training did not start within 450 s:\n{_tail(log)}"
            time.sleep(0.1)
        batch.send_signal(signal.SIGUSR1)
        seen_stop = False
        deadline = time.monotonic() + 30
        while not seen_stop and time.monotonic() < deadline:
            # the trainer removes RUN_DIR/STOP once it honours it (scope_megatron/trainer/loop.py)
            seen_stop = (run_dir / "STOP").exists() or f"created {run_dir}/STOP" in log.read_text()
            time.sleep(0.02)
        assert seen_stop, _tail(log)
        assert batch.wait(timeout=300) == 0, _tail(log)
    finally:
        pids = _server_pids(log.read_text())
        if batch.poll() is None:
            _kill_groups([batch.pid])
        _kill_groups(pids.values())
    text = log.read_text()
    assert f"USR1: created {run_dir}/STOP" in text
    assert set(pids) == {"student-0", "teacher-0"}
    assert _wait_gone(list(pids.values()), timeout=30) == [], "a server outlived the job"
    assert not (out / "servers" / "servers.env").exists()
    assert sorted(read_metrics(run_dir)) == [1]  # trained in OUT/run
    calls = [json.loads(line) for line in srun_log.read_text().splitlines()]
    assert len(calls) == 2 and all("--kill-on-bad-exit=1" in c for c in calls), calls
    server_call, train_call = calls
    assert server_call[server_call.index("-w") + 1] == "127.0.0.1" and "launch/sglang_servers.sh" in server_call
    assert train_call[train_call.index("-w") + 1] == "127.0.0.2"
    assert "sync.master_address=127.0.0.2" not in " ".join(train_call)  # left to the trainer (rank 0's own)
    assert f"run_dir={run_dir}" in train_call and "checkpoint.resume=latest" in train_call  # resubmit: resume


@pytest.mark.timeout(700)
def test_slurm_colocated_layout_serves_a_student_on_every_training_node(assets, tmp_path):
    """COLOCATE=1 on three "nodes": the first serves only the teacher; each of the two training
    nodes runs a student server (memory saver, bound to the node's name) and one trainer rank,
    which feeds that server in memory; the job trains, then stops every server."""
    env, out, srun_log, log = _slurm_job(tmp_path, assets, SLURM_JOB_ID="4343", COLOCATE="1",
                                         SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2,127.0.0.3")
    run_dir = out / "run"
    batch = _submit(assets, env, log)
    try:
        assert batch.wait(timeout=600) == 0, _tail(log)
    finally:
        pids = [int(m.group(2)) for m in re.finditer(r"started (\S+) \(pid (\d+)\)", log.read_text())]
        if batch.poll() is None:
            _kill_groups([batch.pid])
        _kill_groups(pids)
    text = log.read_text()
    names = re.findall(r"started (\S+) \(pid \d+\)", text)
    assert sorted(names) == ["student-0", "student-0", "teacher-0"], names
    assert _wait_gone(pids, timeout=30) == [], "a server outlived the job"
    for node in ("127.0.0.2", "127.0.0.3"):
        first_line = (out / f"servers-{node}" / "logs" / "student-0.log").read_text().splitlines()[0]
        assert "--enable-memory-saver" in first_line and f"--host {node}" in first_line, first_line
        assert not (out / f"servers-{node}" / "servers.env").exists()
    assert not (out / "servers" / "logs" / "student-0.log").exists()  # the server node: the teacher only
    assert sorted(read_metrics(run_dir)) == [1]
    assert "placement: colocated" in (run_dir / "config.yaml").read_text()
    assert text.count("in memory on 2 nodes") == 2, _tail(log)  # the start and step 1
    probes = [json.loads(line) for line in (run_dir / "sync_probe.jsonl").read_text().splitlines()]
    assert {p["engine"].split("//")[1].split(":")[0] for p in probes} == {"127.0.0.2", "127.0.0.3"}
    assert all(p["mean_abs_diff"] <= p["tolerance"] for p in probes), probes
    calls = [json.loads(line) for line in srun_log.read_text().splitlines()]
    assert len(calls) == 3 and all("--kill-on-bad-exit=1" in c for c in calls), calls
    # the two server steps start in the background together: their order in the log is the race's
    (teacher_call,) = [c for c in calls if "ROLES=teacher" in c]
    (student_call,) = [c for c in calls if "ROLES=student" in " ".join(c)]
    (train_call,) = [c for c in calls if "launch/train_multinode.sh" in " ".join(c)]
    assert teacher_call[teacher_call.index("-w") + 1] == "127.0.0.1"
    assert student_call[student_call.index("-w") + 1] == "127.0.0.2,127.0.0.3" and "--overlap" in student_call
    assert train_call[train_call.index("-w") + 1] == "127.0.0.2,127.0.0.3" and "--overlap" in train_call
