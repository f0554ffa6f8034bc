"""Helpers shared by the rollout tests."""

from __future__ import annotations

import time


def wait_until_decoding(engine, timeout=30.0):
    """Block until the engine has a running request with some output tokens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.output_ids for r in list(engine._running)):
            return
        time.sleep(0.005)
    raise TimeoutError("no request started decoding")


def assert_server_dies(url: str, timeout: float = 20.0) -> None:
    """Fail unless the server at ``url`` stops answering within ``timeout`` (its scheduler died)."""
    import httpx
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/model_info", timeout=2)
        except httpx.HTTPError:
            return
        time.sleep(0.2)
    pytest.fail("the server still answers after its scheduler died")
