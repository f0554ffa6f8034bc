"""``scope-megatron serve``: the embedded engine behind SGLang 0.5.23's HTTP protocol.

A FastAPI app (served by uvicorn) in front of :class:`~scope_megatron.rollout.engine.EmbeddedEngine`.
Request and response JSON follow SGLang 0.5.23 (``docs/sglang-protocol.md``) field by field, so the
trainer's :class:`~scope_megatron.rollout.client.SGLangClient` cannot tell it from SGLang.

Endpoints: ``/generate`` (POST/PUT), ``/health``, ``/health_generate``, ``/ready``,
``/model_info`` (+ ``/get_model_info``), ``/server_info`` (+ ``/get_server_info``),
``/update_weights_from_disk``, ``/init_weights_update_group``,
``/update_weights_from_distributed``, ``/destroy_weights_update_group``,
``/begin_weight_update``, ``/end_weight_update``, ``/pause_generation``,
``/continue_generation``, ``/flush_cache``, ``/abort_request``, ``/update_weight_version``,
``/get_weights_by_name``.

Not implemented (answered with HTTP 400 ``{"error": ...}``): streaming, ``text``-less
constraints (regex / json_schema / ebnf / structural_tag / stop_regex), logit_bias,
beam search, custom logit processors, multimodal inputs.

From Python, :func:`start_embedded_server` runs one in a background thread of the calling
process (two of them, student and teacher, can share a trainer process) and
:func:`start_embedded_server_process` runs one as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI

from .engine import EmbeddedEngine, EngineConfig, EngineFatal
from .protocol import ProtocolError
from .server.auth import AuthMiddleware
from .server.routes import ServerState, engine_fatal_handler, protocol_error_handler, router
from .server_process import ServerProcess

logger = logging.getLogger(__name__)

# SGLang 0.5.23 srt/entrypoints/http_server.py:218 (an int, read once)
HEALTH_CHECK_TIMEOUT_ENV = "SGLANG_HEALTH_CHECK_TIMEOUT"
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 20
# the environment torchrun gives its ranks: an engine started by a trainer rank must not inherit it
TORCHRUN_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_ENV_PREFIXES = ("TORCHELASTIC_",)


# ---------------------------------------------------------------------------- the app
def health_check_timeout_s() -> int:
    """``SGLANG_HEALTH_CHECK_TIMEOUT`` (seconds, an int as there), default 20."""
    return int(os.getenv(HEALTH_CHECK_TIMEOUT_ENV, DEFAULT_HEALTH_CHECK_TIMEOUT_S))


def create_app(engine: EmbeddedEngine, api_key: str | None = None, admin_api_key: str | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` with SGLang's endpoints (:mod:`.server.routes`) and auth rules.

    ``on_fatal`` is called when a failure would kill SGLang's scheduler process (the server
    process of ``scope-megatron serve`` exits with it)."""
    app = FastAPI(title="scope-megatron embedded engine")
    control_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="engine-control")
    app.state.server = ServerState(engine=engine, control_pool=control_pool,
                                   health_timeout_s=health_check_timeout_s(), on_fatal=on_fatal)
    if api_key or admin_api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key, admin_api_key=admin_api_key)
    app.add_exception_handler(ProtocolError, protocol_error_handler)
    app.add_exception_handler(EngineFatal, engine_fatal_handler)
    app.include_router(router)
    return app


# ---------------------------------------------------------------------------- running it
def build_arg_parser() -> argparse.ArgumentParser:
    """Flags of ``scope-megatron serve`` (SGLang's names where they exist)."""
    p = argparse.ArgumentParser(prog="scope-megatron serve",
                                description="Embedded engine speaking SGLang 0.5.23's HTTP protocol (transformers).")
    p.add_argument("--model", "--model-path", dest="model", required=True, help="HF model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (0 picks a free one and prints it)")
    p.add_argument("--port-file", default=None,
                   help="write the bound port to this file once listening (with --port 0: no port race)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--admin-api-key", default=None, help="key required by control endpoints")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float", "bfloat16", "float16", "half"])
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--skip-tokenizer-init", action="store_true", help="serve input_ids only")
    p.add_argument("--enable-deterministic-inference", action="store_true",
                   help="honour sampling_seed (SGLang's flag: without it sampling_seed is ignored)")
    # SGLang's flags of these names (srt/server_args.py): /release_memory_occupation frees memory
    # only with the memory saver; the CPU backup keeps the weights' values over a release
    p.add_argument("--enable-memory-saver", action="store_true",
                   help="release_memory_occupation frees the weights and cache (colocated engines)")
    p.add_argument("--enable-weights-cpu-backup", action="store_true",
                   help="keep a CPU copy of the weights while released (restored on resume)")
    p.add_argument("--log-level", default="info")
    return p


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without it, Nagle + delayed ACK add ~40 ms per reply
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# how long a SIGTERM'd server may take to stop before it exits regardless
SHUTDOWN_GRACE_S = 1.5


def _exit_process(code: int) -> None:
    """Flush the logs and leave now: control threads may sit in a broadcast that never ends."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_engine_bounded(engine: EmbeddedEngine, timeout_s: float) -> None:
    """``engine.shutdown()`` (worker, groups) in a daemon thread, waited for at most ``timeout_s``."""
    done = threading.Thread(target=lambda: engine.shutdown(timeout_s=timeout_s), name="engine-shutdown", daemon=True)
    done.start()
    done.join(timeout_s)


def main(argv: list[str]) -> int:
    """Run the server in the foreground until SIGINT/SIGTERM.

    Shutdown is prompt in every state (paused, a weight-update session or group open, requests
    held or waiting, a broadcast in flight): uvicorn gets :data:`SHUTDOWN_GRACE_S` to close its
    connections, the engine as long, then the process exits."""
    import uvicorn

    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = EmbeddedEngine(EngineConfig(
        model_path=args.model, device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
        context_length=args.context_length, random_seed=args.random_seed, weight_version=args.weight_version,
        skip_tokenizer_init=args.skip_tokenizer_init, served_model_name=args.served_model_name,
        enable_deterministic_inference=args.enable_deterministic_inference,
        enable_memory_saver=args.enable_memory_saver, enable_weights_cpu_backup=args.enable_weights_cpu_backup))

    def on_fatal(exc: BaseException) -> None:
        # SGLang's scheduler sends SIGQUIT to the server, which kills its process tree
        # (srt/managers/scheduler.py run_scheduler_process): no reply reaches the caller
        logger.error("scheduler failure, exiting: %s", exc)
        _exit_process(1)

    app = create_app(engine, api_key=args.api_key, admin_api_key=args.admin_api_key, on_fatal=on_fatal)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"scope-megatron serve: listening on http://{host}:{port}", flush=True)
    if args.port_file:  # whole or absent for a reader polling for it
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # a watchdog: whatever uvicorn or the engine still wait for, the process ends in time
            watchdog = threading.Timer(2 * SHUTDOWN_GRACE_S + 0.5, _exit_process, args=(0,))
            watchdog.daemon = True
            watchdog.start()
            engine.begin_shutdown()
            super().handle_exit(sig, frame)

    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    code = 0
    try:
        server.run(sockets=[sock])
    except BaseException:
        logger.exception("the server failed")
        code = 1
    finally:
        _stop_engine_bounded(engine, SHUTDOWN_GRACE_S)
        app.state.server.control_pool.shutdown(wait=False, cancel_futures=True)
    _exit_process(code)
    return code


@dataclass
class EmbeddedServerHandle:
    """A running embedded server: ``url``, ``engine`` (thread mode) or ``process`` (subprocess
    mode), and ``stop()``."""

    url: str
    engine: EmbeddedEngine | None = None
    process: ServerProcess | None = None
    _server: Any = None
    _thread: threading.Thread | None = None
    _stopped: bool = field(default=False)

    @property
    def log_path(self) -> Path | None:
        """The subprocess's log (None in thread mode or without one)."""
        return self.process.log_path if self.process is not None else None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (idempotent): uvicorn shutdown + engine shutdown, or terminate the process."""
        if self._stopped:
            return
        self._stopped = True
        if self.process is not None:
            self.process.stop(grace_s=timeout)
            return
        if self.engine is not None:
            self.engine.begin_shutdown()  # held and queued requests end, so connections close
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        if self.engine is not None:
            self.engine.shutdown()

    def __enter__(self) -> "EmbeddedServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_embedded_server(model_dir: str | Path, port: int = 0, host: str = "127.0.0.1", api_key: str | None = None,
                          admin_api_key: str | None = None, ready_timeout: float = 60.0,
                          **engine_kwargs: Any) -> EmbeddedServerHandle:
    """Load ``model_dir`` and serve it from a background thread of this process.

    ``port=0`` binds a free port (no race: the socket is bound before uvicorn starts).
    ``engine_kwargs`` go to :class:`EngineConfig` (device, dtype, max_batch_size, ...).
    """
    import uvicorn

    engine = EmbeddedEngine(EngineConfig(model_path=str(model_dir), **engine_kwargs))
    servers: list[Any] = []

    def on_fatal(exc: BaseException) -> None:
        # the process is the caller's: stop this server instead of exiting
        engine.begin_shutdown()
        for s in servers:
            s.should_exit = True

    app = create_app(engine, api_key=api_key, admin_api_key=admin_api_key, on_fatal=on_fatal)
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    servers.append(server)
    server.install_signal_handlers = lambda: None  # not the main thread

    def serve() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
        finally:
            sock.close()
            app.state.server.control_pool.shutdown(wait=False, cancel_futures=True)

    thread = threading.Thread(target=serve, name=f"embedded-server-{bound_port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.shutdown()
            raise RuntimeError(f"embedded server on port {bound_port} did not start within {ready_timeout:.0f} s")
        time.sleep(0.01)
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    handle = EmbeddedServerHandle(url=f"http://{url_host}:{bound_port}", engine=engine, _server=server, _thread=thread)
    logger.info("embedded server for %s at %s", model_dir, handle.url)
    return handle


def start_embedded_server_process(model_dir: str | Path, port: int = 0, host: str = "127.0.0.1",
                                  extra_args: list[str] | None = None, log_path: str | Path | None = None,
                                  ready_timeout: float = 120.0, env: dict[str, str] | None = None) -> EmbeddedServerHandle:
    """Start ``python -m scope_megatron.rollout.embedded_server`` as a subprocess and wait until
    it serves (:meth:`~.server_process.ServerProcess.wait_healthy`).

    ``port=0`` (the default) lets the server bind a free port itself and report it through a
    port file: a port picked here and bound seconds later, after the model has loaded, may be
    taken meanwhile by another process of a busy machine.

    The child does not inherit torchrun's rank environment (:data:`TORCHRUN_ENV_KEYS`,
    ``TORCHELASTIC_*``): an engine started by a trainer rank is no member of the trainer's world.
    ``env`` entries are added after that."""
    cmd = [sys.executable, "-m", "scope_megatron.rollout.embedded_server", "--model", str(model_dir),
           "--host", host, "--port", str(port), *(extra_args or [])]
    port_dir = None
    if port == 0:
        port_dir = tempfile.mkdtemp(prefix="scope-serve-")
        port_file = Path(port_dir) / "port"
        cmd += ["--port-file", str(port_file)]
    child_env = {k: v for k, v in os.environ.items()
                 if k not in TORCHRUN_ENV_KEYS and not k.startswith(TORCHRUN_ENV_PREFIXES)}
    # spinning OpenMP threads starve the server's own threads on small CPU boxes
    child_env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    child_env.update(env or {})
    url_host = f"[{host}]" if ":" in host else host
    proc = ServerProcess.spawn(f"embedded server {model_dir}", cmd, f"http://{url_host}:{port}", env=child_env,
                               log_path=log_path)
    handle = EmbeddedServerHandle(url=proc.url, process=proc)
    try:
        deadline = time.monotonic() + ready_timeout
        if port_dir is not None:
            while not port_file.is_file():
                proc.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not listen within {ready_timeout:.0f} s")
                time.sleep(0.05)
            proc.url = handle.url = f"http://{url_host}:{int(port_file.read_text())}"
        healthy = proc.wait_healthy(max(1.0, deadline - time.monotonic()), request_timeout_s=10.0)
    except BaseException:
        handle.stop()
        raise
    finally:
        if port_dir is not None:
            shutil.rmtree(port_dir, ignore_errors=True)
    if not healthy:
        handle.stop()
        raise RuntimeError(f"embedded server at {handle.url} not healthy within {ready_timeout:.0f} s")
    return handle

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
