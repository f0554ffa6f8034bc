"""Start the student and teacher inference servers (SGLang, or the embedded engine) as subprocesses.

- Each replica is one server process (``python -m sglang.launch_server ...`` or
  ``python -m scope_megatron.rollout.embedded_server ...``) with its own GPUs
  (``CUDA_VISIBLE_DEVICES``), port, NCCL port and flags; its log goes to
  ``RUN_DIR/logs/{role}-{i}.log``.
- When a role has several replicas, ``python -m sglang_router.launch_router`` fronts them and
  the role's URL is the router's (weight updates still go to every worker URL: the router
  does not fan them out). A role whose weights are updated (the student) should give its
  router health-check thresholds that outlast a weight update: SGLang's ``/health`` blocks
  while the server is paused for one, and the router evicts a worker after 3 failed probes.
- ``deterministic=True`` launches SGLang with ``--enable-deterministic-inference``: without it
  SGLang ignores a request's ``sampling_seed`` (``rollout.seeded``).
- :meth:`RolloutServers.start` waits until every server answers ``/health``, all at once and
  probing ``/health`` only once a cheap endpoint answers (:mod:`.readiness`; a process that
  exits meanwhile fails the start with its log tail, and everything started is stopped);
  :meth:`RolloutServers.stop` (also at interpreter exit) terminates the process groups.
- :func:`external_endpoints` describes servers started elsewhere (multi-node) the same way.
- ``python -m scope_megatron.rollout.launcher OUT_DIR`` (what ``launch/sglang_servers.sh`` runs)
  starts the groups :func:`server_groups_from_env` reads from the environment, writes
  ``OUT_DIR/servers.env`` once they are healthy and keeps them up until SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..parallel import free_port
from .server_process import ServerProcess, stop_all

logger = logging.getLogger(__name__)


@dataclass
class ServerGroupSpec:
    """One model's servers: ``num_replicas`` processes of ``tp_size`` GPUs each."""

    role: str                                  # "student", "teacher", ...
    model_path: str
    num_replicas: int = 1
    tp_size: int = 1
    gpu_ids: Sequence[int] | None = None       # num_replicas * tp_size ids, assigned in order
    base_port: int | None = None               # None: free ports
    extra_args: Sequence[str] = ()
    engine: str = "sglang"                     # "sglang" or "embedded"
    # SGLang honours a request's sampling_seed only with --enable-deterministic-inference
    # (SGLang 0.5.23 srt/sampling/sampling_batch_info.py:128,157-171); so does the embedded engine
    deterministic: bool = False
    router_port: int | None = None
    router_policy: str = "cache_aware"
    # the router's worker health checks (None: sglang-router 0.3.2's defaults, router_args.py:84-88:
    # a probe every 60 s with a 5 s timeout, a worker evicted after 3 failures in a row)
    router_health_check_timeout_s: int | None = None
    router_health_check_interval_s: int | None = None
    router_health_failure_threshold: int | None = None


@dataclass
class Endpoints:
    """Where one role is served: ``url`` for generation, ``worker_urls`` for weight updates."""

    role: str
    url: str
    worker_urls: list[str]


def external_endpoints(role: str, worker_urls: Sequence[str], router_url: str | None = None) -> Endpoints:
    """Endpoints of servers started elsewhere (``router_url`` defaults to the only worker)."""
    urls = [u.rstrip("/") for u in worker_urls]
    if not urls:
        raise ValueError(f"{role}: no worker URLs")
    if router_url is None and len(urls) > 1:
        raise ValueError(f"{role}: {len(urls)} workers need a router_url for generation")
    return Endpoints(role=role, url=(router_url or urls[0]).rstrip("/"), worker_urls=urls)


def server_command(spec: ServerGroupSpec, host: str, port: int, nccl_port: int, python: str = sys.executable,
                   api_key: str | None = None) -> list[str]:
    """argv of one server process of ``spec``."""
    if spec.engine == "sglang":
        cmd = [python, "-m", "sglang.launch_server", "--model-path", spec.model_path, "--host", host,
               "--port", str(port), "--tp-size", str(spec.tp_size), "--nccl-port", str(nccl_port)]
    elif spec.engine == "embedded":
        if spec.tp_size != 1:
            raise ValueError(f"{spec.role}: the embedded engine has no tensor parallelism (tp_size={spec.tp_size})")
        cmd = [python, "-m", "scope_megatron.rollout.embedded_server", "--model", spec.model_path, "--host", host,
               "--port", str(port)]
        # (the server process gets OMP_WAIT_POLICY=PASSIVE from RolloutServers unless set)
    else:
        raise ValueError(f"{spec.role}: engine must be 'sglang' or 'embedded', got {spec.engine!r}")
    if spec.deterministic:
        cmd.append("--enable-deterministic-inference")
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + list(spec.extra_args)


def router_command(worker_urls: Sequence[str], host: str, port: int, policy: str = "cache_aware",
                   python: str = sys.executable, health_check_timeout_s: int | None = None,
                   health_check_interval_s: int | None = None,
                   health_failure_threshold: int | None = None) -> list[str]:
    """argv of ``sglang_router`` in front of ``worker_urls`` (health-check options: None keeps the router's default)."""
    cmd = [python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--policy", policy,
           "--host", host, "--port", str(port)]
    # flag names: sglang-router 0.3.2 sglang_router/router_args.py:573-595
    for flag, value in (("--health-check-timeout-secs", health_check_timeout_s),
                        ("--health-check-interval-secs", health_check_interval_s),
                        ("--health-failure-threshold", health_failure_threshold)):
        if value is not None:
            if value < 1:
                raise ValueError(f"router {flag} must be >= 1, got {value}")
            cmd += [flag, str(value)]
    return cmd


def router_command_for(spec: ServerGroupSpec, worker_urls: Sequence[str], host: str, port: int,
                       python: str = sys.executable) -> list[str]:
    """argv of the router :class:`RolloutServers` puts in front of ``spec``'s replicas."""
    return router_command(worker_urls, host, port, spec.router_policy, python,
                          health_check_timeout_s=spec.router_health_check_timeout_s,
                          health_check_interval_s=spec.router_health_check_interval_s,
                          health_failure_threshold=spec.router_health_failure_threshold)


@dataclass
class RolloutServers:
    """Launch, wait for, and stop the servers of several roles. Use as a context manager."""

    run_dir: str | Path
    groups: Sequence[ServerGroupSpec]
    host: str = "127.0.0.1"
    python: str = sys.executable
    ready_timeout_s: float = 1800.0
    api_key: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    _procs: list[ServerProcess] = field(default_factory=list, init=False)
    endpoints: dict[str, Endpoints] = field(default_factory=dict, init=False)

    def _spawn(self, name: str, cmd: list[str], url: str, env: dict[str, str]) -> ServerProcess:
        proc = ServerProcess.spawn(name, cmd, url, env={**os.environ, **self.env, **env},
                                   log_path=Path(self.run_dir) / "logs" / f"{name}.log")
        self._procs.append(proc)
        return proc

    def start(self) -> dict[str, Endpoints]:
        """Start every group, wait until all servers are healthy, return endpoints per role."""
        atexit.register(self.stop)
        try:
            pending: list[ServerProcess] = []
            routers: list[tuple[ServerGroupSpec, list[str]]] = []
            for spec in self.groups:
                workers = []
                for i in range(spec.num_replicas):
                    port = spec.base_port + i if spec.base_port is not None else free_port()
                    env: dict[str, str] = {}
                    if spec.gpu_ids is not None:
                        ids = list(spec.gpu_ids)[i * spec.tp_size:(i + 1) * spec.tp_size]
                        if len(ids) != spec.tp_size:
                            raise ValueError(f"{spec.role}: {len(spec.gpu_ids)} gpu_ids for {spec.num_replicas} "
                                             f"replicas of tp {spec.tp_size}")
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in ids)
                    if spec.engine == "embedded":
                        env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
                    url = f"http://{self.host}:{port}"
                    cmd = server_command(spec, self.host, port, free_port(), self.python, self.api_key)
                    pending.append(self._spawn(f"{spec.role}-{i}", cmd, url, env))
                    workers.append(url)
                routers.append((spec, workers))
            self._wait_healthy(pending)
            for spec, workers in routers:
                url = workers[0]
                if len(workers) > 1:
                    port = spec.router_port or free_port()
                    url = f"http://{self.host}:{port}"
                    router = self._spawn(f"{spec.role}-router",
                                         router_command_for(spec, workers, self.host, port, self.python), url, {})
                    self._wait_healthy([router])
                self.endpoints[spec.role] = Endpoints(role=spec.role, url=url, worker_urls=workers)
            return self.endpoints
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, procs: list[ServerProcess]) -> None:
        """Wait for all ``procs`` at once (one thread each); the first one that exits fails the wait."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        given_up = threading.Event()

        def give_up() -> None:
            if given_up.is_set():
                raise RuntimeError("another server failed")

        pool = ThreadPoolExecutor(max_workers=max(len(procs), 1), thread_name_prefix="wait-healthy")
        futures = {pool.submit(proc.wait_healthy, self.ready_timeout_s, headers=headers, give_up=give_up): proc
                   for proc in procs}
        try:
            waiting = [futures[f] for f in as_completed(futures) if not f.result()]
        except BaseException:
            given_up.set()
            raise
        finally:
            pool.shutdown(wait=False)
        if waiting:
            raise TimeoutError(f"not healthy within {self.ready_timeout_s:.0f} s: {[p.name for p in waiting]} "
                               f"(logs in {Path(self.run_dir) / 'logs'})")

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate every started process group (SIGTERM, then SIGKILL after ``grace_s``)."""
        stop_all(reversed(self._procs), grace_s)
        self._procs.clear()

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by server name."""
        return {p.name: p.pid for p in self._procs}

    def __enter__(self) -> dict[str, Endpoints]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServersEnvError(ValueError):
    """A bad variable in the environment of ``launch/sglang_servers.sh`` (the message names it)."""


# launch/sglang_servers.sh's variables and their defaults (its header documents them)
SERVERS_ENV_DEFAULTS: dict[str, str] = {
    "STUDENT_GPUS": "0", "TEACHER_GPUS": "1", "TEACHER_TP": "1", "HOST": "127.0.0.1",
    "STUDENT_PORT": "30000", "TEACHER_PORT": "30100", "ENGINE": "sglang", "SEEDED": "1",
    # SGLang's /health blocks while a weight update pauses the server (SGLang 0.5.23
    # managers/tokenizer_manager.py:938-939, entrypoints/http_server.py:744-799) and the router probes
    # every 60 s: 30 failures in a row are ~30 minutes, longer than any weight update
    "ROUTER_HEALTH_TIMEOUT_S": "30", "ROUTER_HEALTH_FAILURES": "30",
    "EXTRA_STUDENT_ARGS": "", "EXTRA_TEACHER_ARGS": "",
    # COLOCATE=1: one student server over STUDENT_GPUS, which the trainer then trains on too
    # (placement: colocated), with the memory saver and STUDENT_MEM_FRACTION of each GPU for its
    # weights and KV cache (SGLang's --mem-fraction-static)
    "COLOCATE": "0", "STUDENT_MEM_FRACTION": "0.5",
    # which servers to start: both, or one role (launch/slurm/scope.sbatch with COLOCATE=1 runs the
    # teacher on its own node and one colocated student server on each training node)
    "ROLES": "student,teacher",
}
ROLES = ("student", "teacher")


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int:
    value = env.get(name, SERVERS_ENV_DEFAULTS[name])
    try:
        number = int(value)
    except ValueError:
        raise ServersEnvError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ServersEnvError(f"{name}={value!r} must be >= {minimum}")
    return number


def _env_gpus(env: Mapping[str, str], name: str) -> list[int]:
    value = env.get(name, SERVERS_ENV_DEFAULTS[name])
    try:
        ids = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ServersEnvError(f"{name}={value!r} is not a comma-separated list of GPU ids") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise ServersEnvError(f"{name}={value!r}: give one or more distinct GPU ids")
    return ids


def server_groups_from_env(env: Mapping[str, str]) -> list[ServerGroupSpec]:
    """The student and teacher groups ``launch/sglang_servers.sh`` starts, from its variables
    (``SERVERS_ENV_DEFAULTS`` for those unset; ``STUDENT`` and ``TEACHER`` are required for the
    roles in ``ROLES``), in that order."""
    get = lambda name: env.get(name, SERVERS_ENV_DEFAULTS[name])  # noqa: E731
    roles = [r.strip() for r in get("ROLES").split(",") if r.strip()]
    if not roles or len(set(roles)) != len(roles) or not set(roles) <= set(ROLES):
        raise ServersEnvError(f"ROLES={get('ROLES')!r} must name student, teacher or both (comma-separated)")
    for name in (r.upper() for r in ROLES if r in roles):
        if not env.get(name):
            raise ServersEnvError(f"set {name} to the {name.lower()} HF directory")
    student_gpus, teacher_gpus = _env_gpus(env, "STUDENT_GPUS"), _env_gpus(env, "TEACHER_GPUS")
    teacher_tp = _env_int(env, "TEACHER_TP", 1)
    if len(roles) == 2 and set(student_gpus) & set(teacher_gpus):
        raise ServersEnvError(f"STUDENT_GPUS={get('STUDENT_GPUS')} and TEACHER_GPUS={get('TEACHER_GPUS')} overlap")
    if len(teacher_gpus) % teacher_tp:
        raise ServersEnvError(f"TEACHER_GPUS={get('TEACHER_GPUS')}: {len(teacher_gpus)} GPUs are not replicas of "
                              f"TEACHER_TP={teacher_tp}")
    if get("SEEDED") not in ("0", "1"):
        raise ServersEnvError(f"SEEDED must be 0 or 1, got {get('SEEDED')!r}")
    engine = get("ENGINE")
    if engine not in ("sglang", "embedded"):
        raise ServersEnvError(f"ENGINE must be 'sglang' or 'embedded', got {engine!r}")
    if get("COLOCATE") not in ("0", "1"):
        raise ServersEnvError(f"COLOCATE must be 0 or 1, got {get('COLOCATE')!r}")
    student_args = shlex.split(get("EXTRA_STUDENT_ARGS"))
    replicas, student_tp = len(student_gpus), 1
    if get("COLOCATE") == "1":
        # the trainer's layout: one engine over the node's training GPUs, its TP ranks on the
        # trainer's devices; the memory saver lets it hand its memory over between steps
        replicas, student_tp = 1, len(student_gpus)
        if engine == "embedded" and student_tp > 1:
            raise ServersEnvError(f"COLOCATE=1 with ENGINE=embedded serves one GPU (it has no tensor parallelism); "
                                  f"STUDENT_GPUS={get('STUDENT_GPUS')} lists {student_tp}")
        colocated = ["--enable-memory-saver"]
        if engine == "sglang":
            fraction = get("STUDENT_MEM_FRACTION")
            try:
                ok = 0 < float(fraction) < 1
            except ValueError:
                ok = False
            if not ok:
                raise ServersEnvError(f"STUDENT_MEM_FRACTION={fraction!r} must be a fraction in (0, 1)")
            colocated += ["--mem-fraction-static", fraction]
        student_args = colocated + student_args
    groups = [
        ServerGroupSpec(role="student", model_path=env.get("STUDENT", ""), num_replicas=replicas, tp_size=student_tp,
                        gpu_ids=student_gpus, base_port=_env_int(env, "STUDENT_PORT", 1), engine=engine,
                        deterministic=get("SEEDED") == "1", extra_args=student_args,
                        router_health_check_timeout_s=_env_int(env, "ROUTER_HEALTH_TIMEOUT_S", 1),
                        router_health_failure_threshold=_env_int(env, "ROUTER_HEALTH_FAILURES", 1)),
        ServerGroupSpec(role="teacher", model_path=env.get("TEACHER", ""), num_replicas=len(teacher_gpus) // teacher_tp,
                        tp_size=teacher_tp, gpu_ids=teacher_gpus, base_port=_env_int(env, "TEACHER_PORT", 1),
                        engine=engine, extra_args=shlex.split(get("EXTRA_TEACHER_ARGS"))),
    ]
    return [g for g in groups if g.role in roles]


def servers_env_lines(endpoints: Mapping[str, Endpoints], groups: Sequence[ServerGroupSpec],
                      colocated: bool = False) -> list[str]:
    """``servers.env``: the URLs as the trainer's overrides take them, the GPUs the servers hold
    and the machine they are on (``launch/train.sh`` trains on the other GPUs of that machine).
    ``colocated``: the student's GPUs are the trainer's (``COLOCATED_GPUS``, ``PLACEMENT=colocated``),
    not counted in ``SERVER_GPUS``."""
    held = [g for spec in groups if not (colocated and spec.role == "student") for g in (spec.gpu_ids or ())]
    shared = [g for spec in groups if colocated and spec.role == "student" for g in (spec.gpu_ids or ())]
    urls = [line for role in ROLES if role in endpoints
            for line in (f"{role.upper()}_URLS=[{','.join(endpoints[role].worker_urls)}]",
                         f"{role.upper()}_ROUTER={endpoints[role].url}")]
    return [*urls,
            f"SERVER_GPUS={','.join(str(g) for g in held)}",
            f"SERVER_HOSTNAME={socket.gethostname()}",
            f"PLACEMENT={'colocated' if colocated else 'separate'}",
            f"COLOCATED_GPUS={','.join(str(g) for g in shared)}"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scope_megatron.rollout.launcher OUT_DIR``: serve until SIGTERM / Ctrl-C (exit 0)."""
    from ..logs import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m scope_megatron.rollout.launcher OUT_DIR  (variables: launch/sglang_servers.sh)",
              file=sys.stderr)
        return 2
    setup_logging()
    try:
        groups = server_groups_from_env(os.environ)
    except ServersEnvError as exc:
        print(f"sglang_servers: error: {exc}", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    servers_env = out / "servers.env"
    servers_env.unlink(missing_ok=True)  # an old file would point a trainer at servers that are gone
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: object) -> None:
        nonlocal starting
        if starting:  # interrupt the readiness wait: RolloutServers.start stops what it started
            starting = False  # (and a second signal must not interrupt that stop)
            raise SystemExit(128 + signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    servers = RolloutServers(run_dir=out, groups=groups, host=os.environ.get("HOST", SERVERS_ENV_DEFAULTS["HOST"]))
    try:
        with servers as endpoints:
            starting = False
            colocated = os.environ.get("COLOCATE", SERVERS_ENV_DEFAULTS["COLOCATE"]) == "1"
            text = "\n".join(servers_env_lines(endpoints, groups, colocated=colocated)) + "\n"
            tmp = out / "servers.env.tmp"
            tmp.write_text(text)
            tmp.replace(servers_env)  # whole or absent for a reader polling for it
            print(text, end="", flush=True)
            stop.wait()
            logger.info("stopping the servers")
    except (RuntimeError, TimeoutError, ValueError) as exc:  # a server failed to start: its log tail is in exc
        logger.error("%s", exc)
        return 1
    finally:
        servers_env.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
