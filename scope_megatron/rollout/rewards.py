"""0/1 correctness rewards: math-verify on the last ``\\boxed{}`` against the gold answer.

SCOPE uses the reward only for routing (correct -> MLE path, incorrect -> KL path). Rules:

- the answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``) of the response,
  found by a linear brace scanner in the trainer process;
- no ``\\boxed{}``, a truncated response (finish reason ``length``), a parse failure, a timeout
  or a crashed worker all give reward 0, and each is counted in :class:`RewardStats`;
- math-verify runs in worker *processes*: its timeouts use ``SIGALRM``, which only works in a
  process's main thread, and a pathological input must never hang or kill the trainer. Each
  item also has a hard deadline; a worker past it is killed and replaced.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

STATUSES = ("correct", "wrong", "no_answer", "truncated", "parse_error", "timeout", "error", "crash")
BOXED_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in ``text``.

    Braces are matched (escaped ``\\{``/``\\}`` do not count); an unclosed box gives ``None``.
    Linear time, no recursion: safe on any input.
    """
    start = max(text.rfind(cmd) for cmd in BOXED_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in BOXED_COMMANDS if text.startswith(c, start))
    pos = start + len(cmd)
    while pos < len(text) and text[pos] == " " and (pos + 1 >= len(text) or text[pos + 1] in " {"):
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        if text[pos] != " ":  # e.g. \boxedx is another command, not a box
            return None
        rest = text[pos + 1:]
        token = rest.split("$")[0].split()
        return token[0] if token else None
    depth = 0
    i = pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1:i].strip()
        i += 1
    return None


def math_verify_status(predicted: str, gold: str, timeout_s: int = 5) -> str:
    """Compare a predicted answer with the gold one with math-verify: "correct", "wrong" or
    "parse_error". Both are parsed as LaTeX math (``$...$``) or plain expressions."""
    from math_verify import parse, verify
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=timeout_s)
    if not gold_parsed:
        gold_parsed = parse(gold, extraction_config=config, parsing_timeout=timeout_s)
    pred_parsed = parse(f"${predicted}$", extraction_config=config, parsing_timeout=timeout_s)
    if not pred_parsed or not gold_parsed:
        return "parse_error"
    return "correct" if verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s) else "wrong"


@dataclass
class RewardResult:
    """One response's reward (1.0 correct, else 0.0), why, and the extracted answer."""

    reward: float
    status: str
    extracted: str | None = None
    detail: str | None = None


@dataclass
class RewardStats:
    """Cumulative counts per status (see :data:`STATUSES`)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, status: str) -> None:
        """Count one result."""
        self.counts[status] += 1

    def as_dict(self) -> dict[str, int]:
        """All statuses with their counts (zeros included)."""
        return {s: int(self.counts.get(s, 0)) for s in STATUSES}


def _worker_main(conn: Connection, verify_fn: Callable[[str, str, int], Any], inner_timeout_s: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer handles Ctrl-C
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, predicted, gold = msg
        try:
            outcome = verify_fn(predicted, gold, inner_timeout_s)
            status = ("correct" if outcome else "wrong") if isinstance(outcome, bool) else str(outcome)
            conn.send((idx, status, None))
        except BaseException as exc:  # includes RecursionError, TimeoutError from SIGALRM
            try:
                conn.send((idx, "error", f"{type(exc).__name__}: {str(exc)[:300]}"))
            except Exception:
                return


class _Worker:
    def __init__(self, ctx: Any, verify_fn: Callable[..., Any], inner_timeout_s: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, verify_fn, inner_timeout_s), daemon=True,
                                name="reward-worker")
        self.proc.start()
        child.close()
        self.item: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)


class MathRewardPool:
    """Score responses against gold answers in ``num_workers`` processes with a per-item timeout.

    ``timeout_s`` is the hard wall-clock limit per item (the worker is killed past it);
    math-verify's own limit (``inner_timeout_s``) is set below it. ``verify_fn(predicted, gold,
    inner_timeout_s)`` must be a module-level function returning a bool or a status string;
    the default is :func:`math_verify_status`.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, inner_timeout_s: int | None = None,
                 verify_fn: Callable[[str, str, int], Any] = math_verify_status):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.inner_timeout_s = int(inner_timeout_s if inner_timeout_s is not None else max(1, int(timeout_s // 2)))
        self.verify_fn = verify_fn
        self.stats = RewardStats()
        self._ctx = mp.get_context("spawn")  # fork is unsafe in a process with CUDA / threads
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.verify_fn, self.inner_timeout_s)

    def start(self) -> None:
        """Start the workers now (otherwise on the first call)."""
        with self._lock:
            while len(self._workers) < self.num_workers:
                self._workers.append(self._spawn())

    def close(self) -> None:
        """Stop the workers."""
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            for w in self._workers:
                w.proc.join(timeout=2)
                w.kill()
            self._workers.clear()

    def __enter__(self) -> "MathRewardPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def score_async(self, responses: Sequence[str], golds: Sequence[str],
                          truncated: Sequence[bool] | None = None) -> list[RewardResult]:
        """:meth:`score` off the event loop thread."""
        return await asyncio.to_thread(self.score, responses, golds, truncated)

    def score(self, responses: Sequence[str], golds: Sequence[str],
              truncated: Sequence[bool] | None = None) -> list[RewardResult]:
        """Rewards for ``responses`` against ``golds`` (same length); ``truncated[i]`` forces 0."""
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        if truncated is not None and len(truncated) != len(responses):
            raise ValueError(f"truncated has {len(truncated)} flags for {len(responses)} responses")
        results: list[RewardResult | None] = [None] * len(responses)
        todo: deque[int] = deque()
        extracted: list[str | None] = []
        for i, text in enumerate(responses):
            answer = last_boxed_content(text)
            extracted.append(answer)
            if truncated is not None and truncated[i]:
                results[i] = RewardResult(0.0, "truncated", answer)
            elif answer is None or not answer:
                results[i] = RewardResult(0.0, "no_answer", answer)
            else:
                todo.append(i)
        if todo:
            self.start()
            with self._lock:
                self._run(todo, extracted, golds, results)
        final = [r for r in results if r is not None]
        assert len(final) == len(responses)
        for r in final:
            self.stats.add(r.status)
        return final

    def _run(self, todo: deque[int], extracted: list[str | None], golds: Sequence[str],
             results: list[RewardResult | None]) -> None:
        def replace(worker: _Worker) -> None:
            worker.kill()
            self._workers[self._workers.index(worker)] = self._spawn()

        while todo or any(w.item is not None for w in self._workers):
            for w in self._workers:
                if w.item is None and todo:
                    idx = todo.popleft()
                    try:
                        w.conn.send((idx, extracted[idx], str(golds[idx])))
                    except (OSError, ValueError) as exc:
                        results[idx] = RewardResult(0.0, "crash", extracted[idx], f"send failed: {exc}")
                        replace(w)
                        continue
                    w.item = idx
                    w.deadline = time.monotonic() + self.timeout_s
            busy = [w for w in self._workers if w.item is not None]
            if not busy:
                continue
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for w in list(busy):
                if w.conn in ready:
                    try:
                        idx, status, detail = w.conn.recv()
                    except (EOFError, OSError):
                        idx = w.item
                        assert idx is not None
                        results[idx] = RewardResult(0.0, "crash", extracted[idx],
                                                    f"worker exited with code {w.proc.exitcode}")
                        logger.warning("reward worker crashed on item %d (exit code %s)", idx, w.proc.exitcode)
                        replace(w)
                        continue
                    results[idx] = RewardResult(1.0 if status == "correct" else 0.0, status, extracted[idx], detail)
                    w.item = None
                elif time.monotonic() >= w.deadline:
                    idx = w.item
                    assert idx is not None
                    results[idx] = RewardResult(0.0, "timeout", extracted[idx],
                                                f"no verdict within {self.timeout_s:.1f} s")
                    logger.warning("reward item %d timed out after %.1f s; restarting its worker", idx, self.timeout_s)
                    replace(w)
