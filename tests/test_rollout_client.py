"""The async SGLang client against the embedded engine and against misbehaving fake servers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from scope_megatron.rollout.client import (SGLangClient, SGLangConnectionError, SGLangHTTPError, SGLangResponseError,
                                           SGLangTimeoutError, SGLangUpdateError, shared_tls_context)
from scope_megatron.rollout.embedded_server import start_embedded_server, start_embedded_server_process
from scope_megatron.rollout.protocol import SamplingParams
from scope_megatron.examples.tiny_models import save_tiny_hf_model
from tests.dist_utils import free_port

pytestmark = pytest.mark.timeout(120)
PROMPT = [1, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return (save_tiny_hf_model(tmp_path_factory.mktemp("a"), seed=1),
            save_tiny_hf_model(tmp_path_factory.mktemp("b"), seed=2))


class FakeServer:
    """A FastAPI app on a loopback port in a background thread."""

    def __init__(self, app: FastAPI):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def run(coro):
    return asyncio.run(coro)


def test_generate_score_and_disk_update_end_to_end(dirs, tmp_path):
    old, new = dirs
    params = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True, sampling_seed=5)

    async def go(url):
        async with SGLangClient(url, max_concurrency=4) as client:
            await client.wait_ready(timeout_s=10)
            assert await client.ready()
            group = await client.generate_group(PROMPT, 4, params)
            assert len(group) == 4 and len({tuple(g.output_ids) for g in group}) > 1
            for g in group:
                assert g.prompt_ids == PROMPT and len(g.output_ids) == 12 and len(g.output_logprobs) == 12
                assert g.truncated and not g.aborted and g.weight_version == "default"
            # the same model scoring its own samples at temperature 1 gives the sampling log-probs
            scores = await asyncio.gather(*(client.score(PROMPT, g.output_ids) for g in group))
            for g, s in zip(group, scores):
                assert s.token_logprobs == pytest.approx(g.output_logprobs, abs=2e-5)
            batch = await client.score_batch([(PROMPT, g.output_ids) for g in group], top_logprobs_num=2)
            for b, s in zip(batch, scores):
                assert b.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-6)
            assert all(len(b.top_logprobs) == 12 and len(b.top_logprobs[0]) == 2 for b in batch)
            gens = await client.generate_batch([PROMPT, PROMPT[:2]], params.replace(n=2))
            assert [g.prompt_ids for g in gens] == [PROMPT, PROMPT, PROMPT[:2], PROMPT[:2]]
            # the weight-update protocol, call by call
            await client.pause_generation("retract")
            assert not await client.ready()
            assert await client.begin_weight_update() is True
            message = await client.update_weights_from_disk(str(new), weight_version="3")
            assert "Weight version updated to 3" in message
            assert await client.end_weight_update() is True
            await client.continue_generation()
            assert await client.weight_version() == "3"
            after = await client.score(PROMPT, group[0].output_ids)
            assert after.weight_version == "3" and after.token_logprobs != pytest.approx(scores[0].token_logprobs)
            assert "Cache flushed" in await client.flush_cache()
            with pytest.raises(SGLangUpdateError, match="no weight-update session is open"):  # SGLang's text
                await client.end_weight_update()
            with pytest.raises(SGLangHTTPError, match="unknown field `max_tokens`") as info:
                await client._json("POST", "/generate", {"input_ids": PROMPT, "sampling_params": {"max_tokens": 2}})
            assert info.value.status_code == 400

    with start_embedded_server(old) as server:
        run(go(server.url))


def test_server_killed_mid_request_retries_then_clear_error(dirs, tmp_path):
    port = free_port()
    handle = start_embedded_server_process(dirs[0], port=port, log_path=tmp_path / "server.log")
    try:
        async def go():
            client = SGLangClient(handle.url, max_retries=2, backoff_initial_s=0.05)
            await client.pause_generation("retract")  # the request below then waits inside the server
            task = asyncio.create_task(client.generate(PROMPT, SamplingParams(max_new_tokens=50, ignore_eos=True)))
            await asyncio.sleep(0.5)
            assert not task.done()
            os.killpg(handle.process.pid, signal.SIGKILL)
            with pytest.raises(SGLangConnectionError, match="failed after 3 attempts") as info:
                await task
            assert handle.url in str(info.value)
            await client.aclose()
        run(go())
    finally:
        handle.stop()


def test_slow_server_times_out():
    app = FastAPI()

    @app.post("/generate")
    async def slow():
        await asyncio.sleep(1.5)
        return {}

    with FakeServer(app) as fake:
        async def go():
            async with SGLangClient(fake.url, timeout_s=0.3) as client:
                t0 = time.monotonic()
                with pytest.raises(SGLangTimeoutError, match="timed out"):
                    await client.generate(PROMPT, SamplingParams(max_new_tokens=2))
                assert time.monotonic() - t0 < 1.2
        run(go())


def _response(output_ids, logprobs, finish=None):
    return {"text": "", "output_ids": output_ids,
            "meta_info": {"id": "x", "finish_reason": finish or {"type": "length", "length": len(output_ids)},
                          "prompt_tokens": 5, "completion_tokens": len(output_ids), "weight_version": "default",
                          "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, output_ids)],
                          "input_token_logprobs": []}}


def test_malformed_responses_give_clear_errors():
    app = FastAPI()
    state = {"mode": "short"}

    @app.post("/generate")
    async def gen():
        mode = state["mode"]
        if mode == "short":
            return _response([5, 6, 7], [-1.0, -2.0])
        if mode == "null_lp":
            body = _response([5], [-1.0])
            body["meta_info"]["output_token_logprobs"] = [[None, 5, None]]
            return body
        if mode == "no_finish":
            body = _response([5], [-1.0])
            body["meta_info"]["finish_reason"] = None
            return body
        if mode == "score_no_null":
            return {"output_ids": [], "meta_info": {"input_token_logprobs": [[-1.0, 50, None], [-2.0, 9, None]]}}
        return PlainTextResponse("<html>oops</html>")

    cases = {"short": "output_token_logprobs has 2 entries for 3 output_ids",
             "null_lp": "null logprob", "no_finish": "finish_reason is null",
             "html": "not JSON"}
    with FakeServer(app) as fake:
        async def go():
            async with SGLangClient(fake.url) as client:
                for mode, needle in cases.items():
                    state["mode"] = mode
                    with pytest.raises((SGLangResponseError,), match=needle):
                        await client.generate(PROMPT, SamplingParams(max_new_tokens=3))
                state["mode"] = "score_no_null"
                with pytest.raises(SGLangResponseError, match=r"input_token_logprobs\[0\] should be \[null, 50"):
                    await client.score(PROMPT, [9])
        run(go())


def test_5xx_retried_4xx_not_and_old_server_404_tolerated():
    app = FastAPI()
    calls = {"generate": 0, "bad": 0}

    @app.post("/generate")
    async def flaky(request: Request):
        calls["generate"] += 1
        if calls["generate"] < 3:
            return JSONResponse({"error": {"message": "scheduler busy"}}, status_code=503)
        assert request.headers.get("authorization") == "Bearer k1"
        return _response([5, 6], [-0.5, -0.25], {"type": "stop", "matched": 6})

    @app.post("/pause_generation")
    async def pause():
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/update_weights_from_disk")
    async def upd():
        return JSONResponse({"success": False, "message": "Failed to get model loader"}, status_code=400)

    with FakeServer(app) as fake:
        async def go():
            async with SGLangClient(fake.url, api_key="k1", backoff_initial_s=0.01) as client:
                res = await client.generate(PROMPT, SamplingParams(max_new_tokens=2))
                assert calls["generate"] == 3 and res.output_logprobs == [-0.5, -0.25]
                assert res.finish_reason.type == "stop" and res.finish_reason.matched == 6 and not res.truncated
                await client.pause_generation()
                assert await client.begin_weight_update() is False  # 404: an older server
                assert await client.end_weight_update() is False
                with pytest.raises(SGLangUpdateError, match="Failed to get model loader"):
                    await client.update_weights_from_disk("/nowhere")
            async with SGLangClient(fake.url, max_retries=1, backoff_initial_s=0.01) as client:
                calls["generate"] = 0
                with pytest.raises(SGLangHTTPError, match="scheduler busy") as info:
                    await client.generate(PROMPT, SamplingParams(max_new_tokens=2))
                assert info.value.status_code == 503 and calls["generate"] == 2
        run(go())


def test_unreachable_server_fails_after_retries(caplog):
    async def go():
        async with SGLangClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff_initial_s=0.01) as client:
            with caplog.at_level(logging.WARNING, logger="scope_megatron.rollout.client"):
                with pytest.raises(SGLangConnectionError, match="after 3 attempts"):
                    await client.model_info()
            # each retry names the error's type (httpx's messages are often empty)
            retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
            assert len(retries) == 2 and all("failed (ConnectError: " in m for m in retries), retries
            assert not await client.health()
            with pytest.raises(SGLangTimeoutError, match="not ready"):
                await client.wait_ready(timeout_s=0.3, poll_s=0.05)
    run(go())


def test_control_calls_use_a_fresh_connection_each():
    """SGLang 0.5.23 closes idle keep-alive connections after 5 s (srt/environ.py:337,
    srt/entrypoints/http_server.py:2956): a control call, not safe to repeat, must not reuse one."""
    app = FastAPI()
    seen: list[tuple[str, int, str | None]] = []

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str, request: Request):
        seen.append(("/" + path, request.client.port, request.headers.get("connection")))
        if path == "flush_cache":
            return PlainTextResponse("Cache flushed.")
        return {"success": True, "message": "Success", "weight_version": "1"}

    with FakeServer(app) as fake:
        async def go():
            async with SGLangClient(fake.url) as client:
                await client.model_info()
                await client.model_info()  # pooled: the same connection
                await client.pause_generation()
                await client.begin_weight_update()
                await client.update_weights_from_disk("/x")
                await client.end_weight_update()
                await client.flush_cache()
                await client.continue_generation()
        run(go())
    info, control = seen[:2], seen[2:]
    assert info[0][1] == info[1][1] and info[0][2] != "close"
    assert [p for p, _, _ in control] == ["/pause_generation", "/begin_weight_update", "/update_weights_from_disk",
                                          "/end_weight_update", "/flush_cache", "/continue_generation"]
    ports = [port for _, port, _ in control]
    assert len(set(ports)) == len(ports) and info[0][1] not in ports
    assert all(conn == "close" for _, _, conn in control)


def test_clients_share_one_tls_context(monkeypatch):
    """Every pool and every one-shot control connection verifies with one TLS context built once
    per process: httpx would otherwise load the CA bundle for each client it makes (~22 ms of
    CPU), and the trainer makes clients per control call and per sync check."""
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str):
        return {"success": True, "message": "Success", "weight_version": "1"}

    import ssl

    shared_tls_context()  # built before the count starts
    built: list[int] = []
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: built.append(1) or real(*a, **k))
    with FakeServer(app) as fake:
        async def go():
            for _ in range(3):
                async with SGLangClient(fake.url, max_concurrency=64) as client:  # 4 pools
                    await client.model_info()
                    await client.pause_generation()  # a one-shot connection
                    await client.continue_generation()
                    assert len(client._pools) == 4
                    assert all(pool._transport._pool._ssl_context is shared_tls_context() for pool in client._pools)
        run(go())
    assert built == []


def test_input_token_ids_clipped_by_the_server_are_accepted():
    """SGLang 0.5.23 reports input ids >= vocab_size - 1 as 0
    (srt/managers/scheduler_components/logprob_result_processor.py:52-55); the fake server does
    exactly that for a vocabulary of 100."""
    vocab = 100
    app = FastAPI()

    @app.post("/generate")
    async def gen(request: Request):
        body = await request.json()
        ids, start = body["input_ids"], body["logprob_start_len"]
        reported = [t if t < vocab - 1 else 0 for t in ids[start:]]
        entries = [[None if j == 0 else -0.5 * j, t, None] for j, t in enumerate(reported)]
        return {"output_ids": [], "meta_info": {"input_token_logprobs": entries, "weight_version": "default"}}

    with FakeServer(app) as fake:
        async def go():
            async with SGLangClient(fake.url, vocab_size=vocab) as client:
                res = await client.score([1, 2, 99], [5, 99, 0, 98])
                assert res.token_logprobs == [-0.5, -1.0, -1.5, -2.0]
            async with SGLangClient(fake.url) as client:  # vocab unknown: a reported 0 is accepted
                assert len((await client.score([1, 2], [99])).token_logprobs) == 1
            async with SGLangClient(fake.url, vocab_size=200) as client:  # 99 < 199: a real mismatch
                with pytest.raises(SGLangResponseError, match=r"input_token_logprobs\[1\] is for token 0"):
                    await client.score([1, 2], [99])
        run(go())


def test_small_pools_keep_every_request_concurrent():
    """The client splits max_concurrency over pools of CONNECTIONS_PER_POOL connections (httpcore's
    per-request bookkeeping grows with a pool's connections); all max_concurrency requests must still
    be in flight at once: the server answers none until every one of them has arrived."""
    from scope_megatron.rollout.client import CONNECTIONS_PER_POOL

    concurrency = 3 * CONNECTIONS_PER_POOL + 5  # pools of unequal share
    app = FastAPI()
    arrived: list[asyncio.Event] = []
    state = {"n": 0, "peers": set()}

    @app.post("/wait")
    async def wait(request: Request):
        if not arrived:
            arrived.append(asyncio.Event())
        state["n"] += 1
        state["peers"].add(request.client.port)  # one client port per connection
        if state["n"] == concurrency:
            arrived[0].set()
        try:
            await asyncio.wait_for(arrived[0].wait(), timeout=20)
        except asyncio.TimeoutError:
            return JSONResponse({"error": f"only {state['n']} arrived"}, status_code=400)
        return {"ok": True}

    async def go(url):
        async with SGLangClient(url, max_concurrency=concurrency, max_retries=0) as client:
            await asyncio.gather(*(client.request("POST", "/wait", json={}) for _ in range(concurrency)))
            return len(client._pools), max(pool._transport._pool._max_connections for pool in client._pools)

    with FakeServer(app) as server:
        num_pools, largest = run(go(server.url))
    assert state["n"] == concurrency and len(state["peers"]) == concurrency
    assert num_pools == 4 and largest <= CONNECTIONS_PER_POOL
