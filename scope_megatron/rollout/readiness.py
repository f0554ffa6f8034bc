"""Waiting for a freshly started engine server (SGLang, the embedded engine, a router) to serve.

The criterion is SGLang's own: ``GET /health`` answers 200. That probe is not cheap: SGLang
0.5.23 (srt/entrypoints/http_server.py:721-799) runs a 1-token generation and checks for
progress once a second, so a 200 takes at least a second, and the embedded engine follows it.
Polling ``/health`` itself therefore spends that second on every poll. Instead,
:func:`wait_until_healthy` polls a cheap endpoint (``/get_model_info``: any HTTP answer means
the HTTP server is up) every :data:`CONNECT_POLL_S`, and only then asks ``/health``, once, again
after :data:`HEALTH_RETRY_S` while it is not 200 (SGLang answers 503 at once while starting).
"""

from __future__ import annotations

import time
from typing import Callable

import httpx

# answers as soon as the HTTP server runs (the embedded server binds its socket after loading)
CHEAP_PROBE_PATH = "/get_model_info"
CONNECT_POLL_S = 0.05
HEALTH_RETRY_S = 0.5


def wait_until_healthy(url: str, timeout_s: float, check_alive: Callable[[], None] = lambda: None,
                       health_path: str = "/health", headers: dict[str, str] | None = None,
                       request_timeout_s: float = 10.0) -> bool:
    """Block until ``url + health_path`` answers 200 (True) or ``timeout_s`` passed (False).

    ``check_alive`` runs before every probe and raises to give up (e.g. the server process
    exited); ``headers`` go with every request (an API key: ``/get_model_info`` is not open)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(headers=headers or {}, timeout=request_timeout_s) as http:
        while True:
            check_alive()
            wait_s = CONNECT_POLL_S
            try:
                http.get(url + CHEAP_PROBE_PATH)
                if http.get(url + health_path).status_code == 200:
                    return True
                wait_s = HEALTH_RETRY_S
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(wait_s)
