"""Asynchronous client of SGLang 0.5.23's HTTP API (also spoken by the embedded engine).

What the trainer needs (``docs/sglang-protocol.md``):

- :meth:`SGLangClient.generate` / :meth:`~SGLangClient.generate_group`: student rollouts from
  ``input_ids`` with explicit sampling settings and ``return_logprob``; results carry response
  ids, per-token behaviour log-probs, the finish reason (length vs stop) and weight version.
- :meth:`SGLangClient.score`: teacher log-probs of a response, teacher-forced:
  ``max_new_tokens: 0``, ``logprob_start_len = prompt_len - 1``; the leading null entry is
  dropped and the rest checked against the response ids, one value per response token.
- The weight-update protocol (pause -> begin -> init group / update_* -> end -> continue;
  a 404 on begin/end means an older server and is tolerated) and readiness probes.

Robustness: bounded concurrency (a semaphore), retries with exponential backoff on connection
errors and 5xx (only where a retry is safe), timeouts, ``Authorization: Bearer`` API key, and
the server's own error text in every exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Awaitable, Coroutine, Iterator, Sequence, TypeVar

import httpx

from .protocol import FinishReason, LogprobEntry, ProtocolError, SamplingParams, is_int

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Connections per httpx pool. httpcore 1.0's pool walks every connection it holds on each request it
# queues or releases (AsyncConnectionPool._assign_requests_to_connections, with a socket poll per
# idle connection), so one pool of 256 connections spends most of the client's CPU on bookkeeping:
# on 2 CPU cores the demo's evaluation (2048 samples) took 62 s over one such pool, 25 s over pools
# of 16 (8: 29 s, 32: 31 s), against 16 s for the engine alone. Several small pools, each request
# on the least busy one, keep that walk short.
CONNECTIONS_PER_POOL = 16


@functools.lru_cache(maxsize=1)
def shared_tls_context() -> ssl.SSLContext:
    """The TLS context every client of this module verifies with: httpx's default (certifi, or
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), built once per process.

    httpx builds a fresh context for each ``AsyncClient`` it is not given one (``httpx/_config.py``
    ``create_ssl_context``: loading the CA bundle, ~22 ms of CPU on this project's 2-core
    machines) even for ``http://`` URLs. The trainer makes clients per control call and per sync
    check, which cost ~0.2 s of every step's weight sync before they shared this one.
    """
    return httpx.create_ssl_context()


class SGLangError(RuntimeError):
    """Any failure talking to an SGLang server; ``url``, ``status_code`` and ``body`` when known."""

    def __init__(self, message: str, url: str | None = None, status_code: int | None = None, body: str | None = None):
        super().__init__(message)
        self.url = url
        self.status_code = status_code
        self.body = body


class SGLangHTTPError(SGLangError):
    """The server answered with an error status (its text is in the message)."""


class SGLangConnectionError(SGLangError):
    """The server could not be reached, or dropped the connection, after all retries."""


class SGLangTimeoutError(SGLangError):
    """The server did not answer within the timeout."""


class SGLangResponseError(SGLangError):
    """The server answered 200 with a body that violates the protocol."""


class SGLangUpdateError(SGLangError):
    """A control call answered ``{"success": false, ...}``."""


@dataclass
class GenerationResult:
    """One sampled response."""

    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float] | None
    finish_reason: FinishReason
    weight_version: str | None
    weight_versions: list[dict[str, Any]] = field(default_factory=list)
    text: str | None = None
    num_retractions: int = 0
    output_top_logprobs: list[list[tuple[int, float]]] | None = None
    meta_info: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def truncated(self) -> bool:
        """Stopped by the length limit (an incorrect response for SCOPE's reward)."""
        return self.finish_reason.type == "length"

    @property
    def aborted(self) -> bool:
        """Aborted (pause/abort); the output is partial."""
        return self.finish_reason.type == "abort"


@dataclass
class ScoreResult:
    """Teacher-forced log-probs of ``response_ids`` after ``prompt_ids`` (one per response token)."""

    token_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    weight_version: str | None


def _entries(meta: dict[str, Any], key: str, where: str) -> list[LogprobEntry]:
    raw = meta.get(key)
    if not isinstance(raw, list):
        raise ProtocolError(f"{where}.meta_info.{key} is missing or not a list (got {type(raw).__name__})")
    return [LogprobEntry.parse(e, f"{where}.meta_info.{key}[{i}]") for i, e in enumerate(raw)]


def _top_rows(meta: dict[str, Any], key: str, where: str) -> list[list[tuple[int, float]] | None]:
    raw = meta.get(key)
    if not isinstance(raw, list):
        raise ProtocolError(f"{where}.meta_info.{key} is missing or not a list")
    rows: list[list[tuple[int, float]] | None] = []
    for i, row in enumerate(raw):
        if row is None:
            rows.append(None)
            continue
        if not isinstance(row, list):
            raise ProtocolError(f"{where}.meta_info.{key}[{i}] must be a list or null")
        entries = [LogprobEntry.parse(e, f"{where}.meta_info.{key}[{i}][{j}]") for j, e in enumerate(row)]
        rows.append([(e.token_id, float(e.logprob if e.logprob is not None else float("nan"))) for e in entries])
    return rows


def parse_generation(obj: Any, prompt_ids: list[int], want_logprobs: bool, top_logprobs_num: int = 0,
                     where: str = "response") -> GenerationResult:
    """Check and convert one ``/generate`` response object; :class:`ProtocolError` names the field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    output_ids = obj.get("output_ids")
    if not isinstance(output_ids, list) or not all(is_int(t) for t in output_ids):
        raise ProtocolError(f"{where}.output_ids must be a list of ints (got {output_ids!r:.80})")
    meta = obj.get("meta_info")
    if not isinstance(meta, dict):
        raise ProtocolError(f"{where}.meta_info must be an object")
    finish = FinishReason.parse(meta.get("finish_reason"), f"{where}.meta_info.finish_reason")
    if finish is None:
        raise ProtocolError(f"{where}.meta_info.finish_reason is null in a finished response")
    completion = meta.get("completion_tokens")
    if completion is not None and completion != len(output_ids):
        raise ProtocolError(f"{where}.meta_info.completion_tokens is {completion} but output_ids has {len(output_ids)}")
    logprobs = None
    if want_logprobs:
        entries = _entries(meta, "output_token_logprobs", where)
        if len(entries) != len(output_ids):
            raise ProtocolError(f"{where}.meta_info.output_token_logprobs has {len(entries)} entries for "
                                f"{len(output_ids)} output_ids")
        for i, (e, tok) in enumerate(zip(entries, output_ids)):
            if e.token_id != tok:
                raise ProtocolError(f"{where}.meta_info.output_token_logprobs[{i}] is for token {e.token_id}, "
                                    f"output_ids[{i}] is {tok}")
            if e.logprob is None:
                raise ProtocolError(f"{where}.meta_info.output_token_logprobs[{i}] has a null logprob")
        logprobs = [float(e.logprob) for e in entries]  # type: ignore[arg-type]
    top = None
    if want_logprobs and top_logprobs_num > 0:
        rows = _top_rows(meta, "output_top_logprobs", where)
        if len(rows) != len(output_ids) or any(r is None for r in rows):
            raise ProtocolError(f"{where}.meta_info.output_top_logprobs must have one row per output token")
        top = rows  # type: ignore[assignment]
    version = meta.get("weight_version")
    return GenerationResult(prompt_ids=list(prompt_ids), output_ids=list(output_ids), output_logprobs=logprobs,
                            finish_reason=finish, weight_version=None if version is None else str(version),
                            weight_versions=list(meta.get("weight_versions") or []), text=obj.get("text"),
                            num_retractions=int(meta.get("num_retractions") or 0), output_top_logprobs=top,
                            meta_info=meta)


def same_input_token(reported: int, expected: int, vocab_size: int | None = None) -> bool:
    """Whether an ``input_token_logprobs`` entry reported for ``reported`` is the input token ``expected``.

    SGLang 0.5.23 reports every input id ``>= vocab_size - 1`` as 0
    (``srt/managers/scheduler_components/logprob_result_processor.py:52-55``; ``vocab_size``
    is the served model's config value). With the server's ``vocab_size`` known that is the
    only mismatch accepted; without it, a reported 0 is accepted for any expected id (the
    check still catches every other misalignment).
    """
    if reported == expected:
        return True
    if reported != 0:
        return False
    return vocab_size is None or expected >= vocab_size - 1


def parse_score(obj: Any, prompt_ids: list[int], response_ids: list[int], top_logprobs_num: int = 0,
                where: str = "response", vocab_size: int | None = None) -> ScoreResult:
    """Check a teacher-scoring response: R + 1 input entries, the first null, ids matching
    (up to the server's id clipping, see :func:`same_input_token`)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("meta_info"), dict):
        raise ProtocolError(f"{where}: expected an object with meta_info")
    meta = obj["meta_info"]
    entries = _entries(meta, "input_token_logprobs", where)
    r = len(response_ids)
    if len(entries) != r + 1:
        raise ProtocolError(f"{where}.meta_info.input_token_logprobs has {len(entries)} entries; expected "
                            f"{r + 1} (a null entry for the last prompt token, then one per response token)")
    if entries[0].logprob is not None or not same_input_token(entries[0].token_id, prompt_ids[-1], vocab_size):
        raise ProtocolError(f"{where}.meta_info.input_token_logprobs[0] should be [null, {prompt_ids[-1]}, ...], "
                            f"got [{entries[0].logprob}, {entries[0].token_id}, ...]")
    values: list[float] = []
    for j, (e, tok) in enumerate(zip(entries[1:], response_ids), start=1):
        if not same_input_token(e.token_id, tok, vocab_size):
            raise ProtocolError(f"{where}.meta_info.input_token_logprobs[{j}] is for token {e.token_id}, "
                                f"response token {j - 1} is {tok}")
        if e.logprob is None:
            raise ProtocolError(f"{where}.meta_info.input_token_logprobs[{j}] has a null logprob")
        values.append(float(e.logprob))
    top = None
    if top_logprobs_num > 0:
        rows = _top_rows(meta, "input_top_logprobs", where)
        if len(rows) != r + 1 or rows[0] is not None or any(row is None for row in rows[1:]):
            raise ProtocolError(f"{where}.meta_info.input_top_logprobs must have {r + 1} rows, the first null")
        top = rows[1:]  # type: ignore[assignment]
    version = meta.get("weight_version")
    return ScoreResult(token_logprobs=values, top_logprobs=top, weight_version=None if version is None else str(version))


def _error_text(response: httpx.Response) -> str:
    """The server's error text: ``{"error": str}``, ``{"error": {"message"}}``, ``{"message"}`` or plain text."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:2000]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in data:
            return str(data["message"])
    return response.text.strip()[:2000]


class SGLangClient:
    """Async client of one SGLang server or router (``base_url``).

    ``max_concurrency`` bounds in-flight requests. Connection errors are retried for every call
    (the request never reached the server); dropped connections and 5xx only for calls safe to
    repeat (generation, scoring, info). Timeouts raise :class:`SGLangTimeoutError` unless
    ``retry_on_timeout``. Use as ``async with SGLangClient(url) as c: ...`` or call ``aclose()``.
    """

    def __init__(self, base_url: str, api_key: str | None = None, max_concurrency: int = 64,
                 timeout_s: float = 3600.0, connect_timeout_s: float = 10.0, max_retries: int = 3,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0, retry_on_timeout: bool = False,
                 vocab_size: int | None = None):
        self.base_url = base_url.rstrip("/")
        self.vocab_size = vocab_size  # the served model's config vocab size, for the id check of scoring
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retry_on_timeout = retry_on_timeout
        self._pools: list[httpx.AsyncClient] = []  # max_concurrency connections in all
        self._pool_load: list[int] = []            # requests in flight on each pool
        self._semaphore: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> "SGLangClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def _ensure(self) -> asyncio.Semaphore:
        """The pools and the concurrency semaphore of the running event loop (built on first use)."""
        loop = asyncio.get_running_loop()
        if not self._pools or self._loop is not loop:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            num_pools = -(-self.max_concurrency // CONNECTIONS_PER_POOL)
            per_pool = -(-self.max_concurrency // num_pools)
            limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
            self._pools = [httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                             limits=limits, verify=shared_tls_context()) for _ in range(num_pools)]
            self._pool_load = [0] * num_pools
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._loop = loop
        assert self._semaphore is not None
        return self._semaphore

    @contextlib.contextmanager
    def _pooled(self) -> Iterator[httpx.AsyncClient]:
        """The least busy pool, counted busy while the block runs."""
        self._ensure()
        index = min(range(len(self._pools)), key=self._pool_load.__getitem__)
        self._pool_load[index] += 1
        try:
            yield self._pools[index]
        finally:
            self._pool_load[index] -= 1

    def _one_shot_client(self) -> httpx.AsyncClient:
        """A client without a pool: one connection, closed after its response."""
        headers = {"Connection": "close"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
                                 verify=shared_tls_context())

    async def aclose(self) -> None:
        """Close the connection pools."""
        pools, self._pools, self._pool_load = self._pools, [], []
        for pool in pools:
            await pool.aclose()

    # ------------------------------------------------------------------ transport
    async def request(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None,
                      idempotent: bool = True, ok_statuses: Sequence[int] = (200,),
                      timeout_s: float | None = None, fresh_connection: bool = False) -> httpx.Response:
        """Send one request with the retry policy; return the response (status in ``ok_statuses``).

        ``fresh_connection``: send it on a new connection that is closed afterwards
        (``Connection: close``) instead of a pooled keep-alive one. Control calls use it: SGLang
        0.5.23's uvicorn closes idle connections after ``SGLANG_TIMEOUT_KEEP_ALIVE`` = 5 s
        (``srt/environ.py:337``, ``srt/entrypoints/http_server.py:2956``), so a pooled socket
        reused as the server closes it fails with ``RemoteProtocolError``, and a call that is not
        safe to repeat cannot be retried.
        """
        semaphore = self._ensure()
        url = f"{self.base_url}{path}"
        last_error: Exception | None = None
        timeout = httpx.Timeout(timeout_s, connect=self.timeout.connect) if timeout_s is not None else self.timeout
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
                delay *= 0.5 + random.random() / 2
                # the type first: httpx's transport errors often carry an empty message
                logger.warning("%s %s: attempt %d failed (%s: %s); retrying in %.2f s", method, url, attempt,
                               type(last_error).__name__, last_error, delay)
                await asyncio.sleep(delay)
            try:
                async with semaphore:
                    if fresh_connection:
                        async with self._one_shot_client() as one_shot:
                            response = await one_shot.request(method, path, json=json, params=params,
                                                              timeout=timeout)
                    else:
                        with self._pooled() as http:
                            response = await http.request(method, path, json=json, params=params, timeout=timeout)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last_error = exc
                continue
            except httpx.TimeoutException as exc:
                if self.retry_on_timeout and idempotent:
                    last_error = exc
                    continue
                raise SGLangTimeoutError(f"{method} {url} timed out after {timeout.read} s ({type(exc).__name__})",
                                         url=url) from exc
            except httpx.TransportError as exc:  # connection dropped mid-request
                if idempotent:
                    last_error = exc
                    continue
                raise SGLangConnectionError(f"{method} {url} failed: {type(exc).__name__}: {exc} (not retried: "
                                            f"the call is not safe to repeat)", url=url) from exc
            if response.status_code in ok_statuses:
                return response
            text = _error_text(response)
            if response.status_code >= 500 and idempotent:
                last_error = SGLangHTTPError(f"HTTP {response.status_code}: {text}", url, response.status_code, text)
                continue
            raise SGLangHTTPError(f"{method} {url} returned HTTP {response.status_code}: {text}", url=url,
                                  status_code=response.status_code, body=text)
        if isinstance(last_error, SGLangHTTPError):
            raise SGLangHTTPError(f"{method} {url} failed after {self.max_retries + 1} attempts: {last_error}",
                                  url=url, status_code=last_error.status_code, body=last_error.body)
        raise SGLangConnectionError(f"{method} {url} failed after {self.max_retries + 1} attempts: "
                                    f"{type(last_error).__name__}: {last_error}", url=url) from last_error

    async def _json(self, method: str, path: str, body: Any = None, idempotent: bool = True, **kw: Any) -> Any:
        response = await self.request(method, path, json=body, idempotent=idempotent, **kw)
        try:
            return response.json()
        except ValueError as exc:
            raise SGLangResponseError(f"{method} {self.base_url}{path}: the body is not JSON: {response.text[:300]!r}",
                                      url=f"{self.base_url}{path}", status_code=response.status_code,
                                      body=response.text) from exc

    async def _control(self, path: str, body: dict[str, Any], tolerate_404: bool = False,
                       timeout_s: float | None = None) -> dict[str, Any] | None:
        """A control call: not retried once sent; ``success: false`` raises with the server's message."""
        statuses = (200, 400, 404) if tolerate_404 else (200, 400)
        response = await self.request("POST", path, json=body, idempotent=False, ok_statuses=statuses,
                                      timeout_s=timeout_s, fresh_connection=True)
        url = f"{self.base_url}{path}"
        if response.status_code == 404 and tolerate_404:
            logger.info("%s: 404, an older server without this endpoint; skipped", url)
            return None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code == 400 or (isinstance(data, dict) and data.get("success") is False):
            text = _error_text(response)
            raise SGLangUpdateError(f"POST {url} failed (HTTP {response.status_code}): {text}", url=url,
                                    status_code=response.status_code, body=text)
        return data if isinstance(data, dict) else {}

    # ------------------------------------------------------------------ generation
    def _generate_body(self, input_ids: Any, sampling: SamplingParams | dict[str, Any], return_logprob: bool,
                       top_logprobs_num: int, rid: str | None = None, logprob_start_len: Any = None) -> dict[str, Any]:
        params = sampling.to_json() if isinstance(sampling, SamplingParams) else dict(sampling)
        body: dict[str, Any] = {"input_ids": input_ids, "sampling_params": params, "return_logprob": return_logprob}
        if top_logprobs_num:
            body["top_logprobs_num"] = top_logprobs_num
        if logprob_start_len is not None:
            body["logprob_start_len"] = logprob_start_len
        if rid is not None:
            body["rid"] = rid
        return body

    async def generate(self, input_ids: Sequence[int], sampling: SamplingParams, return_logprob: bool = True,
                       top_logprobs_num: int = 0, rid: str | None = None) -> GenerationResult:
        """Sample one response for one prompt (``sampling.n`` must be 1)."""
        if sampling.n != 1:
            raise ValueError("generate() samples one response; use generate_group() for several")
        prompt = [int(t) for t in input_ids]
        body = self._generate_body(prompt, sampling, return_logprob, top_logprobs_num, rid)
        data = await self._json("POST", "/generate", body)
        return self._checked(parse_generation, data, prompt, return_logprob, top_logprobs_num)

    async def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                             return_logprob: bool = True, top_logprobs_num: int = 0) -> list[GenerationResult]:
        """One ``/generate`` call with a batch of prompts (``n`` per prompt, grouped per prompt)."""
        lists = [[int(t) for t in p] for p in prompts]
        body = self._generate_body(lists, sampling, return_logprob, top_logprobs_num)
        data = await self._json("POST", "/generate", body)
        expected = len(lists) * sampling.n
        if not isinstance(data, list) or len(data) != expected:
            raise SGLangResponseError(f"/generate: expected an array of {expected} results, got "
                                      f"{type(data).__name__} of {len(data) if isinstance(data, list) else '-'}",
                                      url=self.base_url + "/generate")
        owners = [p for p in lists for _ in range(sampling.n)]
        return [self._checked(parse_generation, obj, p, return_logprob, top_logprobs_num, where=f"response[{i}]")
                for i, (obj, p) in enumerate(zip(data, owners))]

    async def generate_group(self, input_ids: Sequence[int], group_size: int, sampling: SamplingParams,
                             return_logprob: bool = True, top_logprobs_num: int = 0) -> list[GenerationResult]:
        """``group_size`` samples of one prompt, sent as duplicated prompts (SGLang's advice over
        ``n``), concurrently so a router can spread them. A ``sampling_seed`` becomes seed + i: the
        caller gives the group one seed, and the samples must differ (``n`` samples under one seed
        are identical under deterministic inference)."""
        samples = []
        for i in range(group_size):
            s = sampling if sampling.sampling_seed is None else sampling.replace(sampling_seed=sampling.sampling_seed + i)
            samples.append(self.generate(input_ids, s, return_logprob, top_logprobs_num))
        return list(await asyncio.gather(*samples))

    async def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int],
                    top_logprobs_num: int = 0) -> ScoreResult:
        """Teacher log-probs of each response token given the prompt and earlier response tokens."""
        prompt = [int(t) for t in prompt_ids]
        response = [int(t) for t in response_ids]
        if not prompt:
            raise ValueError("score(): the prompt is empty")
        # The temperature sent does not change the values: SGLang 0.5.23 returns prompt log-probs at
        # temperature 1 whatever it is (layers/logprob_processor.py:726, 734; docs/training.md,
        # "Temperature handling").
        body = self._generate_body(prompt + response, {"max_new_tokens": 0, "temperature": 1.0}, True,
                                   top_logprobs_num, logprob_start_len=len(prompt) - 1)
        data = await self._json("POST", "/generate", body)
        return self._checked(parse_score, data, prompt, response, top_logprobs_num, vocab_size=self.vocab_size)

    async def score_batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                          top_logprobs_num: int = 0) -> list[ScoreResult]:
        """:meth:`score` for many (prompt, response) pairs in one ``/generate`` call."""
        prompts = [[int(t) for t in p] for p, _ in pairs]
        responses = [[int(t) for t in r] for _, r in pairs]
        if any(not p for p in prompts):
            raise ValueError("score_batch(): a prompt is empty")
        body = self._generate_body([p + r for p, r in zip(prompts, responses)],
                                   {"max_new_tokens": 0, "temperature": 1.0}, True, top_logprobs_num,
                                   logprob_start_len=[len(p) - 1 for p in prompts])
        data = await self._json("POST", "/generate", body)
        if not isinstance(data, list) or len(data) != len(pairs):
            raise SGLangResponseError(f"/generate: expected an array of {len(pairs)} results",
                                      url=self.base_url + "/generate")
        return [self._checked(parse_score, obj, p, r, top_logprobs_num, where=f"response[{i}]",
                              vocab_size=self.vocab_size)
                for i, (obj, p, r) in enumerate(zip(data, prompts, responses))]

    def _checked(self, parser: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return parser(*args, **kwargs)
        except ProtocolError as exc:
            raise SGLangResponseError(f"malformed /generate response from {self.base_url}: {exc}",
                                      url=self.base_url + "/generate") from exc

    # ------------------------------------------------------------------ readiness and info
    async def health(self) -> bool:
        """``GET /health`` is 200 (one probe, no retries)."""
        try:
            with self._pooled() as http:
                return (await http.get("/health", timeout=10.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def ready(self) -> bool:
        """``GET /ready`` is 200 (503 while starting or paused)."""
        try:
            with self._pooled() as http:
                return (await http.get("/ready", timeout=10.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 0.5, path: str = "/health") -> None:
        """Poll ``path`` until 200, or raise :class:`SGLangTimeoutError`."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with self._pooled() as http:
                    r = await http.get(path, timeout=10.0)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {_error_text(r)}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(poll_s)
        raise SGLangTimeoutError(f"{self.base_url}{path} not ready within {timeout_s:.0f} s (last: {last})",
                                 url=self.base_url + path)

    async def model_info(self) -> dict[str, Any]:
        """``GET /model_info`` (falls back to the deprecated ``/get_model_info``)."""
        try:
            return await self._json("GET", "/model_info")
        except SGLangHTTPError as exc:
            if exc.status_code != 404:
                raise
            return await self._json("GET", "/get_model_info")

    async def server_info(self) -> dict[str, Any]:
        """``GET /server_info`` (falls back to ``/get_server_info``)."""
        try:
            return await self._json("GET", "/server_info")
        except SGLangHTTPError as exc:
            if exc.status_code != 404:
                raise
            return await self._json("GET", "/get_server_info")

    async def weight_version(self) -> str | None:
        """The server's current weight version (``/model_info``; ``/get_weight_version`` on old servers)."""
        info = await self.model_info()
        if "weight_version" in info:
            return info["weight_version"]
        data = await self._json("GET", "/get_weight_version")
        return data.get("weight_version") if isinstance(data, dict) else None

    # ------------------------------------------------------------------ control
    async def pause_generation(self, mode: str = "retract") -> None:
        """``/pause_generation`` (``abort`` | ``retract`` | ``in_place``)."""
        await self._control("/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        """``/continue_generation``."""
        await self._control("/continue_generation", {"torch_empty_cache": True})

    async def begin_weight_update(self, selector: str = "all") -> bool:
        """Open the weight-update session; False when the server predates it (404)."""
        return await self._control("/begin_weight_update", {"selector": selector}, tolerate_404=True) is not None

    async def end_weight_update(self) -> bool:
        """Close the weight-update session; False when the server predates it (404)."""
        return await self._control("/end_weight_update", {}, tolerate_404=True) is not None

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str = "weight_update_group",
                                        backend: str = "nccl", timeout_s: float | None = None) -> None:
        """``/init_weights_update_group``: blocks until every rank (the trainer too) joined."""
        await self._control("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}, timeout_s=timeout_s)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group",
                                           timeout_s: float | None = None) -> None:
        """``/destroy_weights_update_group``."""
        await self._control("/destroy_weights_update_group", {"group_name": group_name}, timeout_s=timeout_s)

    async def recover_stale_update(self, group_names: Sequence[str] = ("weight_update_group",),
                                   timeout_s: float = 60.0) -> list[str]:
        """Best effort: undo what a trainer that died mid-update left on this server.

        A server that outlived its trainer can still be paused (SGLang 0.5.23 then blocks every
        generation, its ``/health`` probe included: ``managers/tokenizer_manager.py:938-939``,
        ``entrypoints/http_server.py:721-799``), hold an open weight-update session (a new
        ``begin_weight_update`` fails: ``managers/scheduler_components/weight_updater.py:311-316``)
        and keep its broadcast groups (a new group of the same name fails:
        ``model_executor/model_runner_components/weight_updater.py:137-144``). This calls
        ``pause_generation(retract)`` first: on a server that is not paused,
        ``end_weight_update`` takes the model writer lock and so would wait for every running
        generation to finish (``managers/tokenizer_control_mixin.py:471-483``); then, in the
        order of a normal update's teardown, ``end_weight_update`` (a 400 "no weight-update
        session is open" is the normal case), ``destroy_weights_update_group`` for each of
        ``group_names`` (400 "does not exist" is normal, ``weight_updater.py:146-157``) and
        ``continue_generation`` (retracted requests resume). Never raises: returns what it did
        or could not do, one line per call, for the log.
        """
        done: list[str] = []

        async def attempt(what: str, call: Awaitable[Any], benign: tuple[str, ...] = ()) -> None:
            try:
                await call
                done.append(f"{what}: done")
            except SGLangUpdateError as exc:
                text = (exc.body or str(exc)).lower()
                done.append(f"{what}: nothing to do" if any(b in text for b in benign) else f"{what}: {exc}")
            except SGLangError as exc:
                done.append(f"{what}: {exc}")

        await attempt("pause_generation",
                      self._control("/pause_generation", {"mode": "retract"}, timeout_s=timeout_s))
        await attempt("end_weight_update",
                      self._control("/end_weight_update", {}, tolerate_404=True, timeout_s=timeout_s),
                      benign=("no weight-update session", "no weight update session"))
        for name in dict.fromkeys(group_names):
            await attempt(f"destroy_weights_update_group({name})",
                          self._control("/destroy_weights_update_group", {"group_name": name}, timeout_s=timeout_s),
                          benign=("does not exist",))
        await attempt("continue_generation",
                      self._control("/continue_generation", {"torch_empty_cache": True}, timeout_s=timeout_s))
        logger.info("%s: stale-update recovery: %s", self.base_url, "; ".join(done))
        return done

    async def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              group_name: str = "weight_update_group", flush_cache: bool = True,
                                              weight_version: str | None = None, load_format: str | None = None,
                                              timeout_s: float | None = None) -> str:
        """``/update_weights_from_distributed``: the server receives the tensors the trainer then
        broadcasts, in list order. Returns the server's message."""
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                                "flush_cache": flush_cache, "abort_all_requests": False,
                                "weight_version": weight_version}
        if load_format is not None:
            body["load_format"] = load_format
        data = await self._control("/update_weights_from_distributed", body, timeout_s=timeout_s)
        return str((data or {}).get("message", ""))

    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                       load_format: str | None = None, flush_cache: bool = True,
                                       timeout_s: float | None = None) -> str:
        """``/update_weights_from_disk``: reload all weights from ``model_path``."""
        body: dict[str, Any] = {"model_path": model_path, "weight_version": weight_version,
                                "flush_cache": flush_cache, "abort_all_requests": False}
        if load_format is not None:
            body["load_format"] = load_format
        data = await self._control("/update_weights_from_disk", body, timeout_s=timeout_s)
        return str((data or {}).get("message", ""))

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], load_format: str | None = None,
                                         flush_cache: bool = True, weight_version: str | None = None,
                                         timeout_s: float | None = None) -> str:
        """``/update_weights_from_tensor``: one base64 serializer payload per engine TP rank
        (:func:`~.tensor_transport.serialize_for_sglang`; the tensors it shares must stay alive
        until this returns). Returns the server's message."""
        body: dict[str, Any] = {"serialized_named_tensors": list(serialized_named_tensors),
                                "load_format": load_format, "flush_cache": flush_cache,
                                "abort_all_requests": False, "weight_version": weight_version}
        data = await self._control("/update_weights_from_tensor", body, timeout_s=timeout_s)
        return str((data or {}).get("message", ""))

    async def release_memory_occupation(self, tags: Sequence[str] | None = None,
                                        timeout_s: float | None = None) -> None:
        """``/release_memory_occupation`` of ``tags`` (None: weights, kv_cache, cuda_graph). The
        server must be idle: SGLang's scheduler dies otherwise."""
        await self._control("/release_memory_occupation", {"tags": list(tags) if tags else None}, timeout_s=timeout_s)

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None,
                                       timeout_s: float | None = None) -> None:
        """``/resume_memory_occupation`` of ``tags``; resumed weights hold undefined values until pushed."""
        await self._control("/resume_memory_occupation", {"tags": list(tags) if tags else None}, timeout_s=timeout_s)

    async def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> None:
        """``/update_weight_version`` (relabel; SGLang's default would abort all requests)."""
        await self._control("/update_weight_version", {"new_version": new_version,
                                                       "abort_all_requests": abort_all_requests})

    async def flush_cache(self, timeout_s: float = 0.0) -> str:
        """``/flush_cache``; its reply is plain text. Raises with the text on 400."""
        params = {"timeout": timeout_s} if timeout_s else None
        response = await self.request("POST", "/flush_cache", params=params, idempotent=False, ok_statuses=(200, 400),
                                      fresh_connection=True)
        if response.status_code != 200:
            raise SGLangUpdateError(f"POST {self.base_url}/flush_cache failed: {response.text.strip()}",
                                    url=self.base_url + "/flush_cache", status_code=400, body=response.text)
        return response.text

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """``/abort_request`` for one rid or all requests."""
        await self.request("POST", "/abort_request", json={"rid": rid or "", "abort_all": abort_all}, idempotent=True,
                           fresh_connection=True)


def first_leaf(eg: BaseExceptionGroup, prefer: type[BaseException] | tuple[type[BaseException], ...] = ()
               ) -> BaseException:
    """The exception to report from a (nested) ``TaskGroup`` failure: the first non-group leaf in
    depth-first order, or the first leaf that is an instance of ``prefer`` when there is one."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(eg)
    if prefer:
        for leaf in leaves:
            if isinstance(leaf, prefer):
                return leaf
    return leaves[0]


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for synchronous trainer code to drive async clients.

    ``run(coro)`` waits for the result; ``submit(coro)`` returns a ``concurrent.futures.Future``
    (used to keep an HTTP call in flight while the caller broadcasts tensors).
    """

    def __init__(self, name: str = "rollout-client-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> "Future[T]":
        """Schedule ``coro`` on the loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the loop and join its thread."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
