"""ServerProcess: the one way servers are spawned, waited for and stopped."""

from __future__ import annotations

import os
import sys
import time

import pytest

from scope_megatron.parallel import free_port
from scope_megatron.rollout.server_process import ServerProcess, stop_all


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_exit_before_healthy_fails_at_once_with_the_log_tail(tmp_path):
    log = tmp_path / "logs" / "bad.log"
    proc = ServerProcess.spawn("bad", [sys.executable, "-c", "import sys; print('no such model: /x'); sys.exit(3)"],
                               f"http://127.0.0.1:{free_port()}", env=dict(os.environ), log_path=log)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"bad exited with code 3 before becoming healthy") as info:
        proc.wait_healthy(60)
    assert time.monotonic() - start < 30
    assert "no such model: /x" in str(info.value)
    assert log.read_text().startswith(f"$ {sys.executable} -c")  # the log begins with the command line


def test_healthy_server_is_waited_for_then_stopped(tmp_path):
    port = free_port()
    server = (f"import http.server as h\n"
              f"class H(h.BaseHTTPRequestHandler):\n"
              f"    def do_GET(self):\n"
              f"        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
              f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    proc = ServerProcess.spawn("ok", [sys.executable, "-c", server], f"http://127.0.0.1:{port}",
                               env=dict(os.environ), log_path=tmp_path / "ok.log")
    assert proc.wait_healthy(60)
    proc.stop(grace_s=10)
    assert proc.poll() is not None


def test_stop_kills_the_whole_group_when_sigterm_is_ignored(tmp_path):
    pid_file = tmp_path / "child.pid"
    # the server ignores SIGTERM and has a child of its own (as SGLang's scheduler processes are)
    script = f"trap '' TERM; sleep 300 & echo $! > {pid_file}; wait"
    procs = [ServerProcess.spawn(f"stubborn-{i}", ["bash", "-c", script], "http://127.0.0.1:1",
                                 env=dict(os.environ), log_path=tmp_path / f"{i}.log") for i in range(2)]
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    start = time.monotonic()
    stop_all(procs, grace_s=1.0)
    assert time.monotonic() - start < 8  # one shared grace period, not one per server
    assert all(p.poll() is not None for p in procs)
    deadline = time.monotonic() + 10
    while _alive(child):  # SIGKILL went to the group: the grandchild is gone too
        assert time.monotonic() < deadline, "the server's child outlived the stop"
        time.sleep(0.05)
    stop_all(procs)  # stopping again is harmless


def test_embedded_server_binds_its_own_port_and_reports_it(tmp_path):
    """port=0: the server binds a free port itself (no window in which another process can take a
    port picked for it) and the handle's URL is the one it listens on."""
    import httpx

    from scope_megatron.examples.tiny_models import save_tiny_hf_model
    from scope_megatron.rollout.embedded_server import start_embedded_server_process

    model = save_tiny_hf_model(tmp_path / "m", seed=3)
    from concurrent.futures import ThreadPoolExecutor

    handles = []
    try:
        with ThreadPoolExecutor(2) as pool:  # started together, as the trainer starts its engines
            for handle in pool.map(lambda i: start_embedded_server_process(model, log_path=tmp_path / f"engine{i}.log"),
                                   range(2)):
                handles.append(handle)
        urls = [h.url for h in handles]
        assert len(set(urls)) == 2 and all(":0" not in u.rsplit("/", 1)[-1] for u in urls)
        for i, h in enumerate(handles):
            assert f"listening on {h.url}" in (tmp_path / f"engine{i}.log").read_text()
            assert httpx.get(h.url + "/model_info", timeout=10).status_code == 200
    finally:
        for h in handles:
            h.stop()
