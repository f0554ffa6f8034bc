"""One inference server running as a child process: SGLang, its router, or the embedded engine.

Every server the project starts is handled the same way:

- it is spawned in a session of its own (``start_new_session``), so that a signal reaches the
  server and whatever it started (SGLang's scheduler and detokenizer processes) and so that a
  Ctrl-C in the caller's terminal does not reach it before the caller has stopped it in order;
- its output goes to a log file that begins with the command line;
- :meth:`ServerProcess.wait_healthy` waits for ``/health`` (:mod:`.readiness`) and fails at once,
  with the log's tail, if the process exits first;
- :meth:`ServerProcess.stop` sends SIGTERM to the process group, waits, then sends SIGKILL.
  :func:`stop_all` signals several servers before waiting for any of them, so they shut down
  concurrently.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .readiness import wait_until_healthy

logger = logging.getLogger(__name__)

LOG_TAIL_CHARS = 3000
KILL_WAIT_S = 10.0


@dataclass
class ServerProcess:
    """A spawned server: ``name`` (for logs), its ``popen``, the ``url`` it serves and its log."""

    name: str
    popen: subprocess.Popen
    url: str
    log_path: Path | None = None
    health_path: str = "/health"

    @classmethod
    def spawn(cls, name: str, cmd: Sequence[str], url: str, *, env: Mapping[str, str],
              log_path: str | Path | None = None, health_path: str = "/health") -> "ServerProcess":
        """Start ``cmd`` with exactly ``env`` as its environment, its output appended to
        ``log_path`` (discarded when None)."""
        if log_path is None:
            popen = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=dict(env),
                                     start_new_session=True)
        else:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("ab") as log:
                log.write(f"$ {' '.join(cmd)}\n".encode())
                log.flush()
                popen = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                         start_new_session=True)
        logger.info("started %s (pid %d) at %s; log %s", name, popen.pid, url, log_path)
        return cls(name=name, popen=popen, url=url, log_path=log_path, health_path=health_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""
        return self.popen.poll()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of the log ("" without one)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        """Raise RuntimeError, with the log's tail, if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code} before becoming healthy; "
                               f"log {self.log_path}:\n{self.log_tail()}")

    def wait_healthy(self, timeout_s: float, *, headers: dict[str, str] | None = None,
                     give_up: Callable[[], None] = lambda: None, request_timeout_s: float = 5.0) -> bool:
        """Block until ``url + health_path`` answers 200 (True) or ``timeout_s`` passed (False).
        Raises when the process exits first, or when ``give_up`` raises (checked before every probe)."""
        def check() -> None:
            give_up()
            self.check_alive()

        healthy = wait_until_healthy(self.url, timeout_s, check, self.health_path, headers,
                                     request_timeout_s=request_timeout_s)
        if healthy:
            logger.info("%s is healthy", self.name)
        return healthy

    def terminate(self) -> None:
        """Send SIGTERM to the process group (nothing if the process already exited)."""
        self._signal(signal.SIGTERM)

    def wait_or_kill(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the process to exit, then SIGKILL its group."""
        try:
            self.popen.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit after SIGTERM; killing it", self.name)
            self._signal(signal.SIGKILL)
            self.popen.wait(timeout=KILL_WAIT_S)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (idempotent)."""
        self.terminate()
        self.wait_or_kill(grace_s)

    def _signal(self, signum: int) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signum)
        except ProcessLookupError:
            pass


def stop_all(procs: Iterable[ServerProcess], grace_s: float = 20.0) -> None:
    """Stop several servers in the given order: all are signalled, then all share one ``grace_s``."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.wait_or_kill(deadline - time.monotonic())
