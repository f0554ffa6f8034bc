"""Start the student and teacher inference servers (SGLang, or the embedded engine) as subprocesses.

- Each replica is one server process (``python -m sglang.launch_server ...`` or
  ``python -m scope_megatron.rollout.embedded_server ...``) with its own GPUs
  (``CUDA_VISIBLE_DEVICES``), port, NCCL port and flags; its log goes to
  ``RUN_DIR/logs/{role}-{i}.log``.
- When a role has several replicas, ``python -m sglang_router.launch_router`` fronts them and
  the role's URL is the router's (weight updates still go to every worker URL: the router
  does not fan them out).
- :meth:`RolloutServers.start` waits until every server answers ``/health`` (a process that
  exits meanwhile fails the start with its log tail, and everything started is stopped);
  :meth:`RolloutServers.stop` (also at interpreter exit) terminates the process groups.
- :func:`external_endpoints` describes servers started elsewhere (multi-node) the same way.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx

from ..parallel import free_port

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
    router_port: int | None = None
    router_policy: str = "cache_aware"


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
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + list(spec.extra_args)


def router_command(worker_urls: Sequence[str], host: str, port: int, policy: str = "cache_aware",
                   python: str = sys.executable) -> list[str]:
    """argv of ``sglang_router`` in front of ``worker_urls``."""
    return [python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--policy", policy,
            "--host", host, "--port", str(port)]


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str
    health_path: str = "/health"


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
    _procs: list[_Proc] = field(default_factory=list, init=False)
    endpoints: dict[str, Endpoints] = field(default_factory=dict, init=False)

    def _spawn(self, name: str, cmd: list[str], url: str, env: dict[str, str], health_path: str = "/health") -> _Proc:
        log_dir = Path(self.run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env, **env},
                                     start_new_session=True)
        logger.info("started %s (pid %d) at %s; log %s", name, popen.pid, url, log_path)
        proc = _Proc(name, popen, log_path, url, health_path)
        self._procs.append(proc)
        return proc

    def start(self) -> dict[str, Endpoints]:
        """Start every group, wait until all servers are healthy, return endpoints per role."""
        atexit.register(self.stop)
        try:
            pending: list[_Proc] = []
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
                    router = self._spawn(f"{spec.role}-router", router_command(workers, self.host, port,
                                                                               spec.router_policy, self.python),
                                         url, {})
                    self._wait_healthy([router])
                self.endpoints[spec.role] = Endpoints(role=spec.role, url=url, worker_urls=workers)
            return self.endpoints
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, procs: list[_Proc]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        waiting = list(procs)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        while waiting:
            for proc in list(waiting):
                code = proc.popen.poll()
                if code is not None:
                    tail = proc.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{proc.name} exited with code {code} before becoming healthy; "
                                       f"log {proc.log_path}:\n{tail}")
                try:
                    if httpx.get(proc.url + proc.health_path, timeout=5.0, headers=headers).status_code == 200:
                        logger.info("%s is healthy", proc.name)
                        waiting.remove(proc)
                except httpx.HTTPError:
                    pass
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"not healthy within {self.ready_timeout_s:.0f} s: {[p.name for p in waiting]} "
                                   f"(logs in {Path(self.run_dir) / 'logs'})")
            if waiting:
                time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate every started process group (SIGTERM, then SIGKILL after ``grace_s``)."""
        for proc in reversed(self._procs):
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in reversed(self._procs):
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not exit after SIGTERM; killing it", proc.name)
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait(timeout=10)
        self._procs.clear()

    @property
    def pids(self) -> dict[str, int]:
        """Process ids by server name."""
        return {p.name: p.popen.pid for p in self._procs}

    def __enter__(self) -> dict[str, Endpoints]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
