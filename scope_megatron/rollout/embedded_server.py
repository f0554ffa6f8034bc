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
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .engine import EmbeddedEngine, EngineConfig, EngineError, EngineFatal, GenRequest
from .protocol import ProtocolError, expect_bool, expect_int, expect_int_list, validate_sampling_params

logger = logging.getLogger(__name__)

# Known sampling keys the embedded engine does not implement: non-null values are refused.
UNSUPPORTED_SAMPLING_KEYS = ("stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias",
                             "custom_params", "watermark", "choice")
# SGLang 0.5.23 srt/utils/auth.py:101-106: probes are open, matched by prefix
OPEN_PATH_PREFIXES = ("/health", "/ready", "/metrics")
# the endpoints SGLang 0.5.23 marks @auth_level(AuthLevel.ADMIN_OPTIONAL) (srt/entrypoints/http_server.py)
ADMIN_PATHS = ("/update_weights_from_disk", "/init_weights_update_group", "/update_weights_from_distributed",
               "/destroy_weights_update_group", "/begin_weight_update", "/end_weight_update", "/pause_generation",
               "/continue_generation", "/flush_cache", "/abort_request", "/update_weight_version",
               "/get_weights_by_name")
# SGLang 0.5.23 srt/entrypoints/http_server.py:218 (an int, read once)
HEALTH_CHECK_TIMEOUT_ENV = "SGLANG_HEALTH_CHECK_TIMEOUT"
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 20
# the environment torchrun gives its ranks: an engine started by a trainer rank must not inherit it
TORCHRUN_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_ENV_PREFIXES = ("TORCHELASTIC_",)


# ---------------------------------------------------------------------------- /generate parsing
def _per_item(value: Any, batch: int, name: str, parse: Callable[[Any, str], Any], default: Any,
              is_list_form: Callable[[Any], bool]) -> tuple[list[Any], bool]:
    """Broadcast a scalar-or-list request field to ``batch`` items; returns (values, was_list)."""
    if value is None:
        return [default] * batch, False
    if is_list_form(value):
        if len(value) != batch:
            raise ProtocolError(f"{name} has {len(value)} items for a batch of {batch}")
        return [default if v is None else parse(v, f"{name}[{i}]") for i, v in enumerate(value)], True
    return [parse(value, name)] * batch, False


def parse_generate_request(body: Any, engine: EmbeddedEngine) -> tuple[list[GenRequest], bool]:
    """Turn a ``/generate`` JSON body into engine requests (``n`` expanded, grouped per prompt).

    Returns (requests, single) where ``single`` means the reply is one object, not an array.
    Raises :class:`ProtocolError` with text naming the bad field.
    """
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if body.get("input_embeds") is not None:
        raise ProtocolError("input_embeds is not supported by the embedded engine")
    if has_text == has_ids:
        raise ProtocolError("exactly one of text / input_ids must be given")
    if has_ids:
        raw = body["input_ids"]
        if not isinstance(raw, list) or not raw:
            raise ProtocolError("input_ids must be a non-empty list of ints or a list of lists of ints")
        single = not isinstance(raw[0], list)
        prompts = [expect_int_list(raw, "input_ids")] if single else [
            expect_int_list(p, f"input_ids[{i}]") for i, p in enumerate(raw)]
    else:
        raw = body["text"]
        if engine.tokenizer is None:
            raise ProtocolError("text input needs a tokenizer; this server runs without one (send input_ids)")
        single = isinstance(raw, str)
        texts = [raw] if single else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ProtocolError("text must be a string or a list of strings")
        prompts = [engine.tokenizer.encode(t) for t in texts]
    batch = len(prompts)
    for i, p in enumerate(prompts):
        if not p:
            raise ProtocolError(f"input_ids[{i}] is empty" if not single else "input_ids is empty")

    sp_raw = body.get("sampling_params")
    if isinstance(sp_raw, list):
        if len(sp_raw) != batch:
            raise ProtocolError(f"sampling_params has {len(sp_raw)} items for a batch of {batch}")
        params = [validate_sampling_params(s, f"sampling_params[{i}]") for i, s in enumerate(sp_raw)]
    else:
        params = [validate_sampling_params(sp_raw)] * batch
    for i, p in enumerate(params):
        for key in UNSUPPORTED_SAMPLING_KEYS:
            if p.get(key) is not None:
                raise ProtocolError(f"sampling_params.{key} is not supported by the embedded engine")
        if p.get("beam_width", 1) != 1:
            raise ProtocolError("sampling_params.beam_width > 1 is not supported by the embedded engine")
    ns = {p.get("n", 1) for p in params}
    if len(ns) != 1:
        raise ProtocolError("every item of sampling_params must have the same n")
    n = ns.pop()

    def is_list(v: Any) -> bool:
        return isinstance(v, list)

    return_logprob, lp_list = _per_item(body.get("return_logprob"), batch, "return_logprob", expect_bool, False, is_list)
    start_len, sl_list = _per_item(body.get("logprob_start_len"), batch, "logprob_start_len", expect_int, -1, is_list)
    top_num, tn_list = _per_item(body.get("top_logprobs_num"), batch, "top_logprobs_num", expect_int, 0, is_list)
    token_ids_lp, ti_list = _per_item(body.get("token_ids_logprob"), batch, "token_ids_logprob", expect_int_list,
                                      None, lambda v: isinstance(v, list) and bool(v) and isinstance(v[0], list))
    if n > 1 and (lp_list or sl_list or tn_list or ti_list):
        raise ProtocolError("list-form return_logprob / logprob_start_len / top_logprobs_num / token_ids_logprob "
                            "is not allowed with n > 1")
    text_in_lp = expect_bool(body.get("return_text_in_logprobs", False) or False, "return_text_in_logprobs")
    return_prompt_ids = expect_bool(body.get("return_prompt_token_ids", False) or False, "return_prompt_token_ids")
    rid = body.get("rid")
    if rid is None or n > 1:
        rids = [None] * batch
    elif isinstance(rid, str):
        rids = [rid] if single else [f"{rid}_{i}" for i in range(batch)]
    elif isinstance(rid, list) and len(rid) == batch and all(isinstance(r, str) for r in rid):
        rids = list(rid)
    else:
        raise ProtocolError(f"rid must be a string or a list of {batch} strings")

    requests: list[GenRequest] = []
    for i in range(batch):
        for k in range(n):
            # SGLang 0.5.23 srt/managers/tokenizer_manager.py:2163-2183 copies the request for each of
            # the n samples: the same sampling_seed, so identical samples under deterministic inference
            p = dict(params[i])
            kwargs = dict(prompt_ids=list(prompts[i]), params=p, return_logprob=return_logprob[i],
                          logprob_start_len=start_len[i], top_logprobs_num=top_num[i],
                          token_ids_logprob=token_ids_lp[i], return_text_in_logprobs=text_in_lp,
                          return_prompt_token_ids=return_prompt_ids)
            if rids[i] is not None:
                kwargs["rid"] = rids[i]
            requests.append(GenRequest(**kwargs))
    return requests, single and n == 1


# ---------------------------------------------------------------------------- the app
def request_allowed(method: str, path: str, authorization: str | None, api_key: str | None,
                    admin_api_key: str | None) -> bool:
    """SGLang 0.5.23's ``decide_request_auth`` (srt/utils/auth.py:98-151) for this server's endpoints.

    Probes and OPTIONS are open. ADMIN_OPTIONAL endpoints (:data:`ADMIN_PATHS`) need the admin key
    when one is set (the API key is then not accepted), else the API key when one is set, else
    nothing. Every other endpoint needs the API key only when one is set: with only an admin key
    it is open."""
    import secrets

    def bearer_is(expected: str) -> bool:
        parts = (authorization or "").split(" ", 1)
        return len(parts) == 2 and parts[0].lower() == "bearer" and secrets.compare_digest(parts[1], expected)

    if method == "OPTIONS" or path.startswith(OPEN_PATH_PREFIXES):
        return True
    if path in ADMIN_PATHS:
        if admin_api_key:
            return bearer_is(admin_api_key)
        return bearer_is(api_key) if api_key else True
    return bearer_is(api_key) if api_key else True


class _AuthMiddleware:
    """:func:`request_allowed` as pure ASGI middleware; 401 ``{"error": "Unauthorized"}`` otherwise
    (SGLang 0.5.23 srt/utils/auth.py:174-204)."""

    def __init__(self, app: Any, api_key: str | None, admin_api_key: str | None):
        self.app = app
        self.api_key = api_key
        self.admin_api_key = admin_api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization")
            if not request_allowed(scope.get("method", "GET"), scope.get("path", ""),
                                   None if header is None else header.decode("latin-1"),
                                   self.api_key, self.admin_api_key):
                await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def health_check_timeout_s() -> int:
    """``SGLANG_HEALTH_CHECK_TIMEOUT`` (seconds, an int as there), default 20."""
    return int(os.getenv(HEALTH_CHECK_TIMEOUT_ENV, DEFAULT_HEALTH_CHECK_TIMEOUT_S))


def create_app(engine: EmbeddedEngine, api_key: str | None = None, admin_api_key: str | None = None,
               on_fatal: Callable[[BaseException], None] | None = None):
    """The FastAPI app serving ``engine`` with SGLang's endpoints and auth rules.

    ``on_fatal`` is called when a failure would kill SGLang's scheduler process (the server
    process of ``scope-megatron serve`` exits with it)."""
    app = FastAPI(title="scope-megatron embedded engine")
    control_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="engine-control")
    in_flight_rids: set[str] = set()
    # SGLang's ServerStatus (srt/managers/tokenizer_manager.py:4027-4031): Up once serving, UnHealthy
    # after a failed /health probe until a later probe succeeds (http_server.py:781-799)
    server_status = {"value": "Up"}
    health_timeout_s = health_check_timeout_s()

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def failed(message: str, **extra: Any) -> JSONResponse:
        return JSONResponse({"success": False, "message": message, **extra}, status_code=400)

    async def run_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(control_pool, lambda: fn(*args, **kwargs))

    async def json_object(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        import json

        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ProtocolError(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ProtocolError("the body must be a JSON object")
        return data

    def field_of(data: dict[str, Any], key: str, kind: type, default: Any = ..., nullable: bool = False) -> Any:
        if key not in data or (data[key] is None and default is not ...):
            if default is ...:
                raise ProtocolError(f"missing field `{key}`")
            return default
        value = data[key]
        if value is None and nullable:
            return None
        if kind is int:
            return expect_int(value, key)
        if kind is bool:
            return expect_bool(value, key)
        if not isinstance(value, kind):
            raise ProtocolError(f"`{key}` must be of type {kind.__name__}, got {type(value).__name__}")
        return value

    if api_key or admin_api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key, admin_api_key=admin_api_key)

    @app.exception_handler(ProtocolError)
    async def protocol_error(_request: Request, exc: ProtocolError):
        return error(str(exc))

    # ---------------------------------------------------------------- generation
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        body = await json_object(request)
        if body.get("stream"):
            return error("stream=true is not supported by the embedded engine")
        requests, single = parse_generate_request(body, engine)
        dupes = [r.rid for r in requests if r.rid in in_flight_rids]
        if dupes:
            return error(f"Duplicate request ID detected: {dupes[0]}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        for req, fut in zip(requests, futures):
            req.on_done = (lambda res, fut=fut: loop.call_soon_threadsafe(
                lambda: fut.done() or fut.set_result(res)))
        in_flight_rids.update(r.rid for r in requests)
        try:
            engine.submit(requests)
            results = await asyncio.gather(*futures)
        except asyncio.CancelledError:
            engine.withdraw([req.rid for req in requests])
            raise
        except EngineError as exc:
            return error(str(exc), 503)
        finally:
            in_flight_rids.difference_update(r.rid for r in requests)
        for res in results:
            reason = res["meta_info"]["finish_reason"] or {}
            status = reason.get("status_code")
            if reason.get("type") == "abort" and status is not None and status >= 400:
                return JSONResponse({"error": {"message": reason.get("message")}}, status_code=status)
        return JSONResponse(results[0] if single else results)

    # ---------------------------------------------------------------- health and info
    @app.get("/health")
    @app.get("/health_generate")
    async def health():
        """SGLang 0.5.23 srt/entrypoints/http_server.py:721-799: a 1-token probe; 200 as soon as the
        engine produced any output since the probe began (checked once a second), else 503 after
        SGLANG_HEALTH_CHECK_TIMEOUT seconds and the server is UnHealthy. While paused (or while an
        update holds the model) the probe waits in front of the queue, so the answer is 503."""
        if engine.stopping or not engine.healthy:
            return Response(status_code=503)
        tic = time.monotonic()
        probe = GenRequest(prompt_ids=[0], params={"max_new_tokens": 1, "temperature": 0.0})
        try:
            engine.submit([probe])
        except EngineError:
            return Response(status_code=503)
        try:
            while time.monotonic() < tic + health_timeout_s:
                await asyncio.sleep(1)
                if engine.stopping:
                    return Response(status_code=503)
                if engine.last_progress > tic:
                    server_status["value"] = "Up"
                    return Response(status_code=200)
            logger.error("Health check failed. Server couldn't get a response for the last %d seconds.",
                         health_timeout_s)
            server_status["value"] = "UnHealthy"
            return Response(status_code=503)
        finally:
            engine.withdraw([probe.rid])

    @app.get("/ready")
    async def ready():
        # SGLang 0.5.23 srt/managers/tokenizer_manager.py:728-734: not paused, and Up
        up = engine.healthy and server_status["value"] == "Up"
        return Response(status_code=200 if up and not engine.paused else 503)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return engine.model_info()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return {
            "model_path": engine.model_path, "tp_size": 1, "dp_size": 1, "pp_size": 1,
            "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "max_total_num_tokens": engine.context_length * engine.config.max_batch_size,
            "max_req_input_len": engine.context_length - 1, "context_length": engine.context_length,
            "max_batch_size": engine.config.max_batch_size, "weight_version": engine.weight_version,
            "internal_states": [engine.load()], "version": "scope-megatron-embedded", "frontend": "python",
            "skip_tokenizer_init": engine.tokenizer is None, "random_seed": engine.config.random_seed,
            "enable_deterministic_inference": engine.config.enable_deterministic_inference,
        }

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(request: Request):
        data = await json_object(request)
        try:
            return engine.get_weights_by_name(field_of(data, "name", str), field_of(data, "truncate_size", int, 100))
        except EngineError as exc:
            return error(str(exc))

    # ---------------------------------------------------------------- control
    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        data = await json_object(request)
        await run_blocking(engine.pause, field_of(data, "mode", str, "abort"))
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        await json_object(request)
        engine.continue_generation()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(timeout: float = 0.0):
        if await run_blocking(engine.flush_cache, timeout):
            return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                     "(When there are running or waiting requests, the operation will not be performed.)\n")
        return PlainTextResponse("Timed out waiting for idle state." if timeout > 0 else "Flush cache failed.",
                                 status_code=400)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        data = await json_object(request)
        rid = field_of(data, "rid", str, "")
        abort_all = field_of(data, "abort_all", bool, False)
        if rid or abort_all:
            await run_blocking(engine.abort, rid, abort_all)
        return Response(status_code=200)

    def reply(result: tuple[bool, str], **extra: Any) -> JSONResponse:
        success, message = result
        return JSONResponse({"success": success, "message": message, **extra}, status_code=200 if success else 400)

    @app.post("/begin_weight_update")
    async def begin_weight_update(request: Request):
        data = await json_object(request)
        selector = field_of(data, "selector", str, "all")
        if selector not in ("all", "target", "draft"):
            return failed(f"selector must be 'all', 'target' or 'draft', got {selector!r}")
        return reply(await run_blocking(engine.begin_weight_update))

    @app.post("/end_weight_update")
    async def end_weight_update(request: Request):
        await json_object(request)
        return reply(await run_blocking(engine.end_weight_update))

    async def fatal(exc: EngineFatal) -> JSONResponse:
        logger.error("the engine cannot go on: %s", exc)
        if on_fatal is not None:
            on_fatal(exc)
        return JSONResponse({"error": f"the server crashed: {exc}"}, status_code=500)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        data = await json_object(request)
        model_path = field_of(data, "model_path", str)
        version = field_of(data, "weight_version", str, None, nullable=True)
        load_format = field_of(data, "load_format", str, None, nullable=True)
        if load_format not in (None, "auto", "safetensors"):
            return failed(f"load_format {load_format!r} is not supported by the embedded engine (auto, safetensors)",
                          num_paused_requests=0)
        try:
            result = await run_blocking(engine.update_weights_from_disk, model_path, version,
                                        field_of(data, "abort_all_requests", bool, False),
                                        field_of(data, "flush_cache", bool, True))
        except EngineFatal as exc:
            return await fatal(exc)
        return reply(result, num_paused_requests=0)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        data = await json_object(request)
        return reply(await run_blocking(
            engine.init_weights_update_group, field_of(data, "master_address", str),
            field_of(data, "master_port", int), field_of(data, "rank_offset", int), field_of(data, "world_size", int),
            field_of(data, "group_name", str, "weight_update_group"), field_of(data, "backend", str, "nccl")))

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(request: Request):
        data = await json_object(request)
        return reply(await run_blocking(engine.destroy_weights_update_group,
                                        field_of(data, "group_name", str, "weight_update_group")))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        data = await json_object(request)
        return reply(await run_blocking(
            engine.update_weights_from_distributed, field_of(data, "names", list), field_of(data, "dtypes", list),
            field_of(data, "shapes", list), field_of(data, "group_name", str, "weight_update_group"),
            field_of(data, "weight_version", str, None, nullable=True),
            field_of(data, "load_format", str, None, nullable=True),
            field_of(data, "abort_all_requests", bool, False), field_of(data, "flush_cache", bool, True)))

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        data = await json_object(request)
        version = field_of(data, "new_version", str)
        if field_of(data, "abort_all_requests", bool, True):
            await run_blocking(engine.abort, None, True)
        engine._set_version(version)
        return {"success": True, "message": f"Weight version updated to {version}", "new_version": version}

    app.state.engine = engine
    app.state.control_pool = control_pool
    return app


# ---------------------------------------------------------------------------- running it
def build_arg_parser() -> argparse.ArgumentParser:
    """Flags of ``scope-megatron serve`` (SGLang's names where they exist)."""
    p = argparse.ArgumentParser(prog="scope-megatron serve",
                                description="Embedded engine speaking SGLang 0.5.23's HTTP protocol (transformers).")
    p.add_argument("--model", "--model-path", dest="model", required=True, help="HF model directory")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="port (0 picks a free one and prints it)")
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
        enable_deterministic_inference=args.enable_deterministic_inference))

    def on_fatal(exc: BaseException) -> None:
        # SGLang's scheduler sends SIGQUIT to the server, which kills its process tree
        # (srt/managers/scheduler.py run_scheduler_process): no reply reaches the caller
        logger.error("scheduler failure, exiting: %s", exc)
        _exit_process(1)

    app = create_app(engine, api_key=args.api_key, admin_api_key=args.admin_api_key, on_fatal=on_fatal)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"scope-megatron serve: listening on http://{host}:{port}", flush=True)

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
        app.state.control_pool.shutdown(wait=False, cancel_futures=True)
    _exit_process(code)
    return code


@dataclass
class EmbeddedServerHandle:
    """A running embedded server: ``url``, ``engine`` (thread mode) and ``stop()``."""

    url: str
    engine: EmbeddedEngine | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _server: Any = None
    _thread: threading.Thread | None = None
    _stopped: bool = field(default=False)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (idempotent): uvicorn shutdown + engine shutdown, or terminate the process."""
        if self._stopped:
            return
        self._stopped = True
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
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
            app.state.control_pool.shutdown(wait=False, cancel_futures=True)

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


def start_embedded_server_process(model_dir: str | Path, port: int, host: str = "127.0.0.1",
                                  extra_args: list[str] | None = None, log_path: str | Path | None = None,
                                  ready_timeout: float = 120.0, env: dict[str, str] | None = None) -> EmbeddedServerHandle:
    """Start ``python -m scope_megatron.rollout.embedded_server`` as a subprocess and wait for ``/health``.

    The child does not inherit torchrun's rank environment (:data:`TORCHRUN_ENV_KEYS`,
    ``TORCHELASTIC_*``): an engine started by a trainer rank is no member of the trainer's world.
    ``env`` entries are added after that."""
    import httpx

    cmd = [sys.executable, "-m", "scope_megatron.rollout.embedded_server", "--model", str(model_dir),
           "--host", host, "--port", str(port), *(extra_args or [])]
    child_env = {k: v for k, v in os.environ.items()
                 if k not in TORCHRUN_ENV_KEYS and not k.startswith(TORCHRUN_ENV_PREFIXES)}
    # spinning OpenMP threads starve the server's own threads on small CPU boxes
    child_env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    child_env.update(env or {})
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env,
                            start_new_session=True)
    if log_path:
        log_file.close()
    url = f"http://{host}:{port}"
    handle = EmbeddedServerHandle(url=url, process=proc, log_path=Path(log_path) if log_path else None)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            tail = Path(log_path).read_text(errors="replace")[-2000:] if log_path else ""
            raise RuntimeError(f"embedded server exited with code {proc.returncode} before becoming ready\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=10.0).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"embedded server at {url} not healthy within {ready_timeout:.0f} s")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
