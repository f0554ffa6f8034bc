"""The embedded engine's scheduling: one worker thread, its queues, pauses and the update lock.

Requests (already validated) are queued; the worker takes up to ``max_batch_size`` of them and
hands the batch to :meth:`Scheduler.run_batch` (the model runner, :mod:`.embedded`), which
calls :meth:`Scheduler.between_steps` after every decode step. Semantics follow SGLang 0.5.23
(``docs/sglang-protocol.md`` §4):

- pause modes ``abort`` / ``retract`` / ``in_place``;
- requests that arrive while generation is paused, or while a weight update waits for the
  in-flight requests, are held in front of the queue (SGLang holds them in its tokenizer
  manager), so they are neither "waiting" for ``flush_cache`` nor run early;
- weight updates (:meth:`Scheduler.exclusive`) wait for running requests unless generation is
  paused (SGLang's writer-preferring lock);
- two weight versions: the tokenizer manager's (``/model_info``, a whole update call) and the
  scheduler's (the per-token ``weight_versions`` spans).

All state below is guarded by ``_cond``; the model itself by ``_model_lock``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

from ..protocol import ProtocolError
from .request import EngineConfig, EngineError, GenRequest, aborted_reason

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "retract", "in_place")


class Scheduler:
    """Queues, the worker thread, pause modes, aborts and the weight-update lock.

    A subclass supplies :meth:`prepare` (validate a request, seed its generator) and
    :meth:`run_batch` (generate for a batch until every request finished or left), then calls
    :meth:`start_worker`. Public methods are thread-safe."""

    def __init__(self, config: EngineConfig):
        self.config = config
        # SGLang keeps two versions: the tokenizer manager's (``/model_info``, set only when a whole
        # update call succeeded: srt/managers/tokenizer_control_mixin.py:529-531) and the
        # scheduler's (the per-token ``weight_versions`` spans, recorded as soon as the weights
        # loaded: srt/managers/scheduler_components/weight_updater.py:234-238)
        self.weight_version = config.weight_version
        self.scheduler_version = config.weight_version
        # the last time the worker produced output (SGLang's last_receive_tstamp, read by /health)
        self.last_progress = time.monotonic()
        self._cond = threading.Condition()
        self._held: deque[GenRequest] = deque()   # arrived while paused / while an update is pending
        self._waiting: deque[GenRequest] = deque()
        self._running: list[GenRequest] = []
        self._paused: str | None = None          # None or the pause mode
        self._update_pending = 0
        self._stopping = False
        self._model_lock = threading.Lock()       # held for every forward and every weight write
        self._worker_parked = False
        self._worker = threading.Thread(target=self._loop, name="embedded-engine", daemon=True)

    # ------------------------------------------------------------------ subclass hooks
    def prepare(self, req: GenRequest) -> None:
        """Validate ``req`` against the model (raise :class:`ProtocolError`) and seed its generator."""
        raise NotImplementedError

    def run_batch(self, batch: list[GenRequest]) -> None:
        """Generate for ``batch`` until every request finished, or the batch left on a pause."""
        raise NotImplementedError

    def start_worker(self) -> None:
        """Start the worker thread (once the model is ready)."""
        self._worker.start()

    # ------------------------------------------------------------------ state
    @property
    def healthy(self) -> bool:
        """The worker thread is alive."""
        return self._worker.is_alive() and not self._stopping

    @property
    def paused(self) -> bool:
        """Generation is paused."""
        return self._paused is not None

    @property
    def stopping(self) -> bool:
        """``shutdown`` has begun."""
        return self._stopping

    def load(self) -> dict[str, int]:
        """Queue sizes (``/get_load``-like)."""
        with self._cond:
            return {"num_running_reqs": len(self._running), "num_waiting_reqs": len(self._waiting)}

    # ------------------------------------------------------------------ requests
    def submit(self, requests: list[GenRequest]) -> None:
        """Queue requests; each one's ``on_done`` gets the finished request (worker thread).

        While generation is paused or a weight update waits for the model, new requests are
        held and reach the queue later (SGLang 0.5.23 srt/managers/tokenizer_manager.py:938-941:
        ``generate_request`` waits on ``is_pause_cond``, then on the model-update reader lock)."""
        for req in requests:
            self.prepare(req)
        with self._cond:
            if self._stopping:
                raise EngineError("the engine is shutting down")
            if self._paused is not None or self._update_pending:
                self._held.extend(requests)
            else:
                self._waiting.extend(requests)
            self._cond.notify_all()

    def _release_held(self) -> None:
        """Move held requests to the queue once neither a pause nor an update holds them (under _cond)."""
        if self._held and self._paused is None and not self._update_pending:
            self._waiting.extend(self._held)
            self._held.clear()
            self._cond.notify_all()

    def withdraw(self, rids: list[str]) -> None:
        """Forget requests whose caller went away: held ones are dropped, queued or running ones aborted."""
        wanted = set(rids)
        with self._cond:
            self._held = deque(r for r in self._held if r.rid not in wanted)
        for rid in wanted:
            self.abort(rid)

    def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        """Abort one request (by exact rid) or all; returns how many were marked."""
        count = 0
        with self._cond:
            for req in [*self._running, *self._waiting]:
                if abort_all or req.rid == rid:
                    req.abort_requested = True
                    count += 1
            queued = [r for r in self._waiting if r.abort_requested]
            self._waiting = deque(r for r in self._waiting if not r.abort_requested)
            self._cond.notify_all()
        for req in queued:
            self.finish(req, aborted_reason())
        return count

    def finish(self, req: GenRequest, reason: dict[str, Any]) -> None:
        """End ``req`` with ``reason`` (once), note what its response reports, call ``on_done``."""
        if req.finish is not None:
            return
        req.finish = reason
        self.last_progress = time.monotonic()
        req.finished_at = self.last_progress
        req.finished_weight_version = self.weight_version
        req.finished_scheduler_version = self.scheduler_version
        if req.on_done is not None:
            try:
                req.on_done(req)
            except Exception:
                logger.exception("delivering the result of %s failed", req.rid)

    # ------------------------------------------------------------------ pause
    def pause(self, mode: str = "abort") -> None:
        """``/pause_generation``: ``abort`` (finish everything as aborted), ``retract`` (put
        running requests back in the queue, KV dropped) or ``in_place`` (keep them, frozen)."""
        if mode not in PAUSE_MODES:
            raise ProtocolError(f"mode must be 'abort', 'retract' or 'in_place', got {mode!r}")
        with self._cond:
            self._paused = mode
            self._cond.notify_all()
        if mode == "abort":
            self.abort(abort_all=True)
        # wait until the worker has acted on the pause (no forward pass in flight)
        with self._cond:
            self._cond.wait_for(lambda: not self._running or self._worker_parked, timeout=60)

    def continue_generation(self) -> None:
        """``/continue_generation``: held requests reach the queue."""
        with self._cond:
            self._paused = None
            self._cond.notify_all()
            self._release_held()

    def _fully_idle(self) -> bool:
        """SGLang 0.5.23 srt/managers/scheduler.py:5337-5355 ``is_fully_idle(ignore_waiting=paused)``
        as ``flush_cache`` calls it (5518-5519): nothing running (a batch frozen by an in-place pause
        counts), and nothing queued unless the scheduler is paused (retract / in_place; an
        ``abort`` pause never reaches the scheduler: tokenizer_manager.py:2267-2280). Under _cond."""
        scheduler_paused = self._paused in ("retract", "in_place")
        return not self._running and (scheduler_paused or not self._waiting)

    def flush_cache(self, timeout_s: float = 0.0) -> bool:
        """Succeeds when the scheduler is fully idle (waits up to ``timeout_s`` for it)."""
        with self._cond:
            return self._cond.wait_for(self._fully_idle, timeout=max(timeout_s, 0.0))

    # ------------------------------------------------------------------ worker
    def begin_shutdown(self) -> None:
        """Start stopping without waiting: every queued, held or running request finishes as
        aborted, a parked (in-place paused) worker and waiting updates wake up."""
        with self._cond:
            self._stopping = True
            self._paused = None
            held = list(self._held)
            self._held.clear()
            self._cond.notify_all()
        self.abort(abort_all=True)
        for req in held:
            self.finish(req, aborted_reason())

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the worker, waiting up to ``timeout_s`` for its current step."""
        self.begin_shutdown()
        self._worker.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            with self._cond:
                # queued requests still run while an update waits: they hold SGLang's reader lock
                # (tokenizer_manager.py:941-951), which the update's writer lock waits for
                self._cond.wait_for(lambda: self._stopping or (self._waiting and self._paused is None))
                if self._stopping:
                    return
                if not self._gather_companions():
                    continue
                batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.config.max_batch_size))]
                self._running = batch
            try:
                self.run_batch(batch)
            except Exception as exc:  # report to every request of the batch, keep serving
                logger.exception("batch of %d failed", len(batch))
                for req in batch:
                    if req.finish is None:
                        self.finish(req, aborted_reason(f"engine error: {exc}", 500, "InternalServerError"))
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()

    def _gather_companions(self) -> bool:
        """Hold the queue (lock held) until no request arrived for ``batch_wait_s``, the oldest has
        waited ``batch_wait_max_s``, or a full batch is queued; False when a stop, a pause or an
        abort emptied it meanwhile."""
        while len(self._waiting) < self.config.max_batch_size:
            now = time.monotonic()
            remaining = min(self.config.batch_wait_s - (now - self._waiting[-1].created),
                            self.config.batch_wait_max_s - (now - self._waiting[0].created))
            if remaining <= 0:
                break
            self._cond.wait(timeout=remaining)
            if self._stopping or self._paused is not None or not self._waiting:
                return False
        return True

    def between_steps(self, batch: list[GenRequest]) -> bool:
        """Act on a pause between decode steps; True when the batch left the worker
        (every request finished, or the live ones were retracted to the queue)."""
        if self._paused is None:
            return False
        with self._cond:
            while True:
                mode = self._paused
                if self._stopping or mode == "abort":
                    for req in batch:
                        req.abort_requested = True
                    break
                if mode is None:
                    break
                if mode == "retract":
                    live = [r for r in batch if r.finish is None]
                    for req in live:
                        req.num_retractions += 1
                    self._waiting.extendleft(reversed(live))
                    logger.info("retracted %d running requests", len(live))
                    return True
                # in_place: keep the batch (and its KV) frozen until the mode changes
                self._worker_parked = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._paused != "in_place" or self._stopping)
                self._worker_parked = False
        for req in batch:
            if req.finish is None and req.abort_requested:
                self.finish(req, aborted_reason())
        return all(r.finish is not None for r in batch)

    # ------------------------------------------------------------------ the update lock and versions
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Writer side of SGLang's model-update lock: unless paused, hold new requests back and wait
        until every request already admitted (queued or running) finished; then hold the model lock.

        SGLang 0.5.23 srt/managers/tokenizer_control_mixin.py:507-515 (update calls take the writer
        lock unless paused) and tokenizer_manager.py:941-951 (each request holds the reader lock
        until its reply)."""
        with self._cond:
            self._update_pending += 1
            try:
                if self._paused is None:
                    self._cond.wait_for(lambda: self._stopping or (not self._running and not self._waiting))
                if self._stopping:
                    raise EngineError("the engine is shutting down")
            except BaseException:
                self._update_pending -= 1
                self._release_held()
                raise
        try:
            with self._model_lock:
                yield
        finally:
            with self._cond:
                self._update_pending -= 1
                self._cond.notify_all()
                self._release_held()

    def record_scheduler_version(self, version: str | None) -> None:
        """The scheduler's version change: later output tokens count under ``version``
        (SGLang 0.5.23 srt/managers/scheduler.py:5636-5651)."""
        if version is None or version == self.scheduler_version:
            return
        with self._cond:
            old = self.scheduler_version
            for req in [*self._running, *self._waiting, *self._held]:
                if req.output_ids:
                    req.version_events.append((old, len(req.output_ids)))
            self.scheduler_version = version

    def set_weight_version(self, version: str | None) -> None:
        """``/update_weight_version``: both the scheduler's and the tokenizer manager's version
        (SGLang 0.5.23 srt/managers/tokenizer_control_mixin.py:1065-1079)."""
        if version is None:
            return
        self.record_scheduler_version(version)
        self.weight_version = version
