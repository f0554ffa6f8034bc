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
