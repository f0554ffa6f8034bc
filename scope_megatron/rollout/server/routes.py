"""The embedded server's endpoints, as SGLang 0.5.23 answers them (srt/entrypoints/http_server.py).

Every route reads its :class:`ServerState` from ``request.app.state.server`` (set by
``embedded_server.create_app``). Engine calls that block (pauses, flushes, weight updates) run
in the state's control thread pool, so the event loop keeps serving ``/generate`` meanwhile.
Control endpoints that return ``(success, message)`` reply through :func:`engine_reply`:
200 ``{"success": true, "message": ...}`` or 400 with ``success: false``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..engine import EmbeddedEngine, EngineError, EngineFatal, GenRequest
from ..engine.weights import decode_serialized_entry
from ..protocol import ProtocolError, expect_bool, expect_int
from .generate import generate_response, parse_generate_request

logger = logging.getLogger(__name__)

router = APIRouter()


@dataclass
class ServerState:
    """What the routes of one app share."""

    engine: EmbeddedEngine
    control_pool: ThreadPoolExecutor
    health_timeout_s: int                # SGLANG_HEALTH_CHECK_TIMEOUT, read once at start
    # called when a failure would kill SGLang's scheduler process
    on_fatal: Callable[[BaseException], None] | None = None
    in_flight_rids: set[str] = field(default_factory=set)
    # SGLang's ServerStatus (srt/managers/tokenizer_manager.py:4027-4031): Up once serving, UnHealthy
    # after a failed /health probe until a later probe succeeds (http_server.py:781-799)
    status: str = "Up"


def server_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request``."""
    return request.app.state.server


# ---------------------------------------------------------------------------- replies and fields
def error(message: str, status: int = 400) -> JSONResponse:
    """SGLang's ``{"error": message}`` reply."""
    return JSONResponse({"error": message}, status_code=status)


def failed(message: str, **extra: Any) -> JSONResponse:
    """A control endpoint's refusal: 400 ``{"success": false, "message": ...}``."""
    return JSONResponse({"success": False, "message": message, **extra}, status_code=400)


def reply(result: tuple[bool, str], **extra: Any) -> JSONResponse:
    """A control endpoint's ``(success, message)`` as SGLang replies it (200, else 400)."""
    success, message = result
    return JSONResponse({"success": success, "message": message, **extra}, status_code=200 if success else 400)


async def run_blocking(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the control pool, awaited."""
    pool = server_state(request).control_pool
    return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*args))


async def engine_reply(request: Request, fn: Callable[..., tuple[bool, str]], *args: Any, **extra: Any) -> JSONResponse:
    """Run an engine update call in the control pool and :func:`reply` its ``(success, message)``.

    An :class:`EngineFatal` it raises reaches :func:`engine_fatal_handler`."""
    return reply(await run_blocking(request, fn, *args), **extra)


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("the body must be a JSON object")
    return data


def field_of(data: dict[str, Any], key: str, kind: type, default: Any = ..., nullable: bool = False) -> Any:
    """``data[key]`` checked against ``kind`` (ints and bools as strictly as SGLang's pydantic);
    ``default`` when absent or null (no default: the field is required)."""
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


async def protocol_error_handler(_request: Request, exc: ProtocolError) -> JSONResponse:
    """A malformed request: 400 ``{"error": ...}`` naming the field."""
    return error(str(exc))


async def engine_fatal_handler(request: Request, exc: EngineFatal) -> JSONResponse:
    """A failure that kills SGLang's scheduler: the server's ``on_fatal`` (``scope-megatron serve``
    exits in it, so no reply is sent), else 500."""
    logger.error("the engine cannot go on: %s", exc)
    on_fatal = server_state(request).on_fatal
    if on_fatal is not None:
        on_fatal(exc)
    return JSONResponse({"error": f"the server crashed: {exc}"}, status_code=500)


# ---------------------------------------------------------------------------- generation
@router.api_route("/generate", methods=["POST", "PUT"])
async def generate(request: Request):
    state = server_state(request)
    engine = state.engine
    body = await json_object(request)
    if body.get("stream"):
        return error("stream=true is not supported by the embedded engine")
    requests, single = parse_generate_request(body, engine)
    dupes = [r.rid for r in requests if r.rid in state.in_flight_rids]
    if dupes:
        return error(f"Duplicate request ID detected: {dupes[0]}")
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in requests]

    def deliver_to(fut: asyncio.Future) -> Callable[[GenRequest], None]:
        # the reply is built on the worker thread as the request finishes, then handed to the loop
        def on_done(finished: GenRequest) -> None:
            res = generate_response(finished, engine)
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(res))
        return on_done

    for req, fut in zip(requests, futures):
        req.on_done = deliver_to(fut)
    state.in_flight_rids.update(r.rid for r in requests)
    try:
        engine.submit(requests)
        results = await asyncio.gather(*futures)
    except asyncio.CancelledError:
        engine.withdraw([req.rid for req in requests])
        raise
    except EngineError as exc:
        return error(str(exc), 503)
    finally:
        state.in_flight_rids.difference_update(r.rid for r in requests)
    for res in results:
        reason = res["meta_info"]["finish_reason"] or {}
        status = reason.get("status_code")
        if reason.get("type") == "abort" and status is not None and status >= 400:
            return JSONResponse({"error": {"message": reason.get("message")}}, status_code=status)
    return JSONResponse(results[0] if single else results)


# ---------------------------------------------------------------------------- health and info
@router.get("/health")
@router.get("/health_generate")
async def health(request: Request):
    """SGLang 0.5.23 srt/entrypoints/http_server.py:721-799: a 1-token probe; 200 as soon as the
    engine produced any output since the probe began (checked once a second), else 503 after
    SGLANG_HEALTH_CHECK_TIMEOUT seconds and the server is UnHealthy. While paused (or while an
    update holds the model) the probe waits in front of the queue, so the answer is 503."""
    state = server_state(request)
    engine = state.engine
    if engine.stopping or not engine.healthy:
        return Response(status_code=503)
    tic = time.monotonic()
    probe = GenRequest(prompt_ids=[0], params={"max_new_tokens": 1, "temperature": 0.0})
    try:
        engine.submit([probe])
    except EngineError:
        return Response(status_code=503)
    try:
        while time.monotonic() < tic + state.health_timeout_s:
            await asyncio.sleep(1)
            if engine.stopping:
                return Response(status_code=503)
            if engine.last_progress > tic:
                state.status = "Up"
                return Response(status_code=200)
        logger.error("Health check failed. Server couldn't get a response for the last %d seconds.",
                     state.health_timeout_s)
        state.status = "UnHealthy"
        return Response(status_code=503)
    finally:
        engine.withdraw([probe.rid])


@router.get("/ready")
async def ready(request: Request):
    # SGLang 0.5.23 srt/managers/tokenizer_manager.py:728-734: not paused, and Up
    state = server_state(request)
    up = state.engine.healthy and state.status == "Up"
    return Response(status_code=200 if up and not state.engine.paused else 503)


@router.get("/model_info")
@router.get("/get_model_info")
async def model_info(request: Request):
    return server_state(request).engine.model_info()


@router.get("/server_info")
@router.get("/get_server_info")
async def server_info(request: Request):
    engine = server_state(request).engine
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


@router.api_route("/get_weights_by_name", methods=["GET", "POST"])
async def get_weights_by_name(request: Request):
    data = await json_object(request)
    try:
        return server_state(request).engine.get_weights_by_name(field_of(data, "name", str),
                                                                field_of(data, "truncate_size", int, 100))
    except EngineError as exc:
        return error(str(exc))


# ---------------------------------------------------------------------------- control
@router.post("/pause_generation")
async def pause_generation(request: Request):
    data = await json_object(request)
    await run_blocking(request, server_state(request).engine.pause, field_of(data, "mode", str, "abort"))
    return {"message": "Generation paused successfully.", "status": "ok"}


@router.post("/continue_generation")
async def continue_generation(request: Request):
    await json_object(request)
    server_state(request).engine.continue_generation()
    return {"message": "Generation continued successfully.", "status": "ok"}


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request, timeout: float = 0.0):
    if await run_blocking(request, server_state(request).engine.flush_cache, timeout):
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")
    return PlainTextResponse("Timed out waiting for idle state." if timeout > 0 else "Flush cache failed.",
                             status_code=400)


@router.post("/abort_request")
async def abort_request(request: Request):
    data = await json_object(request)
    rid = field_of(data, "rid", str, "")
    abort_all = field_of(data, "abort_all", bool, False)
    if rid or abort_all:
        await run_blocking(request, server_state(request).engine.abort, rid, abort_all)
    return Response(status_code=200)


# ---------------------------------------------------------------------------- weight updates
@router.post("/begin_weight_update")
async def begin_weight_update(request: Request):
    data = await json_object(request)
    selector = field_of(data, "selector", str, "all")
    if selector not in ("all", "target", "draft"):
        return failed(f"selector must be 'all', 'target' or 'draft', got {selector!r}")
    return await engine_reply(request, server_state(request).engine.begin_weight_update)


@router.post("/end_weight_update")
async def end_weight_update(request: Request):
    await json_object(request)
    return await engine_reply(request, server_state(request).engine.end_weight_update)


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(request: Request):
    data = await json_object(request)
    model_path = field_of(data, "model_path", str)
    version = field_of(data, "weight_version", str, None, nullable=True)
    load_format = field_of(data, "load_format", str, None, nullable=True)
    if load_format not in (None, "auto", "safetensors"):
        return failed(f"load_format {load_format!r} is not supported by the embedded engine (auto, safetensors)",
                      num_paused_requests=0)
    return await engine_reply(request, server_state(request).engine.update_weights_from_disk, model_path, version,
                              field_of(data, "abort_all_requests", bool, False),
                              field_of(data, "flush_cache", bool, True), num_paused_requests=0)


@router.post("/init_weights_update_group")
async def init_weights_update_group(request: Request):
    data = await json_object(request)
    return await engine_reply(
        request, server_state(request).engine.init_weights_update_group, field_of(data, "master_address", str),
        field_of(data, "master_port", int), field_of(data, "rank_offset", int), field_of(data, "world_size", int),
        field_of(data, "group_name", str, "weight_update_group"), field_of(data, "backend", str, "nccl"))


@router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request):
    data = await json_object(request)
    return await engine_reply(request, server_state(request).engine.destroy_weights_update_group,
                              field_of(data, "group_name", str, "weight_update_group"))


@router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: Request):
    data = await json_object(request)
    return await engine_reply(
        request, server_state(request).engine.update_weights_from_distributed, field_of(data, "names", list),
        field_of(data, "dtypes", list), field_of(data, "shapes", list),
        field_of(data, "group_name", str, "weight_update_group"),
        field_of(data, "weight_version", str, None, nullable=True),
        field_of(data, "load_format", str, None, nullable=True),
        field_of(data, "abort_all_requests", bool, False), field_of(data, "flush_cache", bool, True))


@router.post("/update_weight_version")
async def update_weight_version(request: Request):
    engine = server_state(request).engine
    data = await json_object(request)
    version = field_of(data, "new_version", str)
    if field_of(data, "abort_all_requests", bool, True):
        await run_blocking(request, engine.abort, None, True)
    engine.set_weight_version(version)
    return {"success": True, "message": f"Weight version updated to {version}", "new_version": version}


# ---------------------------------------------------------------------------- colocated engines
def memory_tags(data: dict[str, Any]) -> list[str] | None:
    """``tags``: null or a list of strings (io_struct.py:2177-2191); any string is kept, as SGLang
    keeps unknown tags in its offload set."""
    tags = field_of(data, "tags", list, None, nullable=True)
    if tags is not None and not all(isinstance(t, str) for t in tags):
        raise ProtocolError("`tags` must be a list of strings")
    return tags


@router.api_route("/release_memory_occupation", methods=["GET", "POST"])
async def release_memory_occupation(request: Request):
    # SGLang 0.5.23 srt/entrypoints/http_server.py:1575-1584: the handler returns nothing (200, null)
    data = await json_object(request)
    await run_blocking(request, server_state(request).engine.release_memory_occupation, memory_tags(data))
    return JSONResponse(None)


@router.api_route("/resume_memory_occupation", methods=["GET", "POST"])
async def resume_memory_occupation(request: Request):
    # http_server.py:1587-1596 there
    data = await json_object(request)
    await run_blocking(request, server_state(request).engine.resume_memory_occupation, memory_tags(data))
    return JSONResponse(None)


@router.post("/update_weights_from_tensor")
async def update_weights_from_tensor(request: Request):
    """SGLang 0.5.23 http_server.py:1436-1455 with the body of io_struct.py:2027-2047."""
    data = await json_object(request)
    entries = field_of(data, "serialized_named_tensors", list)
    serialized = [decode_serialized_entry(e, i) for i, e in enumerate(entries)]
    selector = field_of(data, "selector", str, "all")
    if selector not in ("all", "target", "draft"):
        raise ProtocolError(f"selector must be 'all', 'target' or 'draft', got {selector!r}")
    field_of(data, "torch_empty_cache", bool, False)
    return await engine_reply(
        request, server_state(request).engine.update_weights_from_tensor, serialized,
        field_of(data, "load_format", str, None, nullable=True), field_of(data, "flush_cache", bool, True),
        field_of(data, "abort_all_requests", bool, False), field_of(data, "weight_version", str, None, nullable=True))
