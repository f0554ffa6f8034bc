"""Rank 0's controller: rollouts from the student engines, teacher scoring, rewards, one batch.

Per step (:meth:`RolloutController.collect`), all concurrently on one asyncio loop:

- G samples of each of the B prompts are requested from the student engine (one request per
  sample, so a router can spread them); with ``rollout.seeded`` each sample gets the sampling
  seed ``hash(seed, step, prompt index, sample)``, so a resumed run draws the same responses;
- each response is sent to the teacher for teacher-forced scoring **as soon as it arrives**
  (overlapping generation: the paper measured teacher scoring at a third of its step);
- when a prompt's G responses are in, their rewards run in the math-verify process pool
  (also overlapping the remaining generation and scoring).

An engine that fails after the client's retries (connection refused, 5xx, timeout, a
malformed answer, an aborted request) raises :class:`EngineFailure` naming the engine, the
role and the cause; the other requests of the step are cancelled.

Seeds are honoured by SGLang only on servers started with ``--enable-deterministic-inference``
(SGLang 0.5.23 srt/sampling/sampling_batch_info.py:128-171 builds the per-request seed tensor
only then; otherwise sampling is unseeded), so :meth:`RolloutController.check_student_servers`
reads each student worker's ``/server_info`` at connect. SGLang does not offset the seed of the
``n`` samples of one request (srt/managers/tokenizer_manager.py:2163-2183 copies the request),
which is why every sample is its own request with its own seed.

Teacher top-k rows (``algorithm.topk_kl``) come from the teacher's full padded vocabulary
(SGLang's top-k runs over all ``config.vocab_size`` logits), which may be larger than the
student's. An entry whose id the student does not have is masked: its id becomes an id of the
student's vocabulary that the row does not hold and its log-prob ``-inf``, which
:func:`scope_megatron.objective.logprobs.topk_kl` reads as absent (the KL is that of the row
without the entry). The masked entries of a step are counted in ``teacher/topk_masked``.

Several teachers (``teacher.routes``): each prompt's responses go to the teacher its data source
routes to (:meth:`RolloutController.teacher_of`; the default teacher otherwise), so a group has
one teacher; each trajectory records which (``Trajectory.teacher``).

Refilling (``algorithm.refill_filtered_groups``, DAPO's dynamic sampling): groups whose samples
are all correct or all wrong carry no signal for a group-relative objective and are filtered; with
refill the controller drops them itself and draws more prompts (from the run's sampler, so a
resumed run draws the same ones) until ``rollout.prompts_per_step`` informative groups are in or
``algorithm.refill_max_rounds`` extra rounds have run. Each round asks for the missing groups
divided by the fraction kept so far (at most B prompts); informative groups beyond B are
discarded, as DAPO does. The counts go to the step's metrics (``data/refill_*``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from ..config import DEFAULT_TEACHER, ConfigError
from ..rollout.batch_transport import tensor_backed
from ..rollout.client import first_leaf
from ..rollout.types import RolloutBatch, Trajectory
from .batching import uniform_groups

logger = logging.getLogger(__name__)


def load_function(spec: str) -> Any:
    """``package.module:function`` -> the function."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"algorithm.reward_function={spec!r} cannot be loaded: {exc}") from exc


class EngineFailure(RuntimeError):
    """A student or teacher engine failed (after retries); the step cannot complete."""


class ServerSetupError(ConfigError):
    """A student server runs without what ``rollout.seeded`` needs (the message says what to do)."""

    def __init__(self, message: str):
        super().__init__("rollout.seeded", message)


def mask_topk_row(ids: list[int], logprobs: list[float], vocab_size: int) -> int:
    """Mask, in place, the entries of one teacher top-k row whose id is outside ``[0, vocab_size)``.

    A masked entry gets the smallest id of the student's vocabulary not already in the row (the
    row's ids stay distinct and gatherable) and log-prob ``-inf`` (absent for ``topk_kl``).
    Returns the number of masked entries.
    """
    bad = [k for k, i in enumerate(ids) if not 0 <= i < vocab_size]
    if not bad:
        return 0
    used = {i for i in ids if 0 <= i < vocab_size}
    spare = (i for i in range(vocab_size) if i not in used)
    for k in bad:
        try:
            ids[k] = next(spare)
        except StopIteration:  # a row longer than the vocabulary cannot come from a real server
            raise ValueError(f"a top-{len(ids)} row cannot be masked inside a vocabulary of {vocab_size}") from None
        logprobs[k] = float("-inf")
    return len(bad)


def sampling_seed(seed: int, step: int, prompt_index: int, sample: int, refill_round: int = 0) -> int:
    """A 48-bit seed from (run seed, step, prompt, sample): reproducible across restarts.

    Training samples are sent one request each (so teacher scoring overlaps generation) and
    hashed from their whole key, so no two steps or prompts share seeds; the eval runner instead
    seeds by problem id, ``base + i`` per sample (:func:`..evaluation.runner.sample_seed`).
    ``refill_round`` > 0 (a prompt drawn again while refilling, possible once the sampler wraps
    around a small dataset) is part of the key, so a repeated prompt is not sampled identically.
    """
    key = f"{seed}/{step}/{prompt_index}/{sample}" + (f"/refill{refill_round}" if refill_round else "")
    digest = hashlib.blake2b(key.encode(), digest_size=6).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Refill:
    """Drawing more prompts until ``target`` informative groups are in (see the module docstring)."""

    target: int                            # groups wanted: rollout.prompts_per_step
    max_rounds: int                        # extra rounds at most: algorithm.refill_max_rounds
    draw: Callable[[int], list[Any]]       # n -> the sampler's next n PromptRecords


def _regroup(groups: list[list[Trajectory]]) -> list[Trajectory]:
    """The trajectories of ``groups`` with their group numbers renumbered 0..len(groups)-1."""
    return [replace(t, group=gi) for gi, members in enumerate(groups) for t in members]


class RolloutController:
    """Drives the student and teacher engines for one step at a time (rank 0 only)."""

    def __init__(self, *, student_url: str, teacher_url: str, group_size: int, sampling: Any, seed: int,
                 seeded: bool, tokenizer: Any, reward_pool: Any, loop: Any, api_key: str | None = None,
                 max_concurrency: int = 256, teacher_max_concurrency: int = 256, request_timeout_s: float = 3600.0,
                 max_retries: int = 3, retry_backoff_s: float = 0.5, reward_function: Any = None,
                 teacher_topk: int = 0, student_vocab_size: int | None = None,
                 other_teachers: dict[str, tuple[str, int]] | None = None, routes: dict[str, str] | None = None,
                 student_workers: Sequence[str] = ()):
        """``teacher_url``: the default teacher; ``other_teachers``: name -> (URL, max concurrency)
        of more teachers and ``routes``: data source -> teacher name (teacher.routes).
        ``student_workers``: several student workers and no router in front of them (``student_url``
        is then the first): prompt group i of a step is generated by worker i mod N, so a group's
        samples share one worker's prefix cache, and ``max_concurrency`` is split between them."""
        from ..rollout.client import SGLangClient

        workers = [student_url] if len(student_workers) <= 1 else list(student_workers)
        self.student_url = workers[0]
        self.student_urls = workers
        self.teacher_urls = {DEFAULT_TEACHER: teacher_url, **{n: u for n, (u, _) in (other_teachers or {}).items()}}
        self.routes = dict(routes or {})
        self.group_size = group_size
        self.sampling = sampling
        self.seed = seed
        self.teacher_topk = teacher_topk  # > 0: the teacher also returns its top-k at every response token
        # teacher top-k ids at or above it are masked (None: ids are kept as they come)
        self.student_vocab_size = student_vocab_size
        self.seeded = seeded
        self.tokenizer = tokenizer
        self.reward_pool = reward_pool
        self.reward_function = reward_function
        self.loop = loop
        common = dict(api_key=api_key, timeout_s=request_timeout_s, max_retries=max_retries,
                      backoff_initial_s=retry_backoff_s, retry_on_timeout=False)
        per_worker = max(1, -(-max_concurrency // len(workers)))
        self.students = [SGLangClient(url, max_concurrency=per_worker, **common) for url in workers]
        self.student = self.students[0]
        self.teachers = {DEFAULT_TEACHER: SGLangClient(teacher_url, max_concurrency=teacher_max_concurrency, **common)}
        for name, (url, concurrency) in (other_teachers or {}).items():
            self.teachers[name] = SGLangClient(url, max_concurrency=concurrency, **common)

    @property
    def teacher(self) -> Any:
        """The default teacher's client."""
        return self.teachers[DEFAULT_TEACHER]

    def teacher_of(self, record: Any) -> str:
        """The name of the teacher that scores ``record``'s responses (by its data source)."""
        return self.routes.get(getattr(record, "source", ""), DEFAULT_TEACHER)

    def close(self) -> None:
        async def close_all() -> None:
            for student in self.students:
                await student.aclose()
            for teacher in self.teachers.values():
                await teacher.aclose()
        try:
            self.loop.run(close_all(), timeout=10)
        except Exception:  # closing is best effort
            pass

    def wait_ready(self, timeout_s: float = 600.0, recover_urls: Sequence[str] = ()) -> None:
        """Wait until both engines answer /health. ``recover_urls``: student workers that may have
        outlived a killed trainer; a paused SGLang server fails /health, so they are first cleaned
        up (best effort, :meth:`SGLangClient.recover_stale_update`)."""
        from ..rollout.client import SGLangClient

        async def both() -> None:
            async def recover(url: str) -> None:
                async with SGLangClient(url, api_key=self.student.api_key) as worker:
                    await worker.recover_stale_update()
            await asyncio.gather(*(recover(u) for u in recover_urls))
            await asyncio.gather(*(student.wait_ready(timeout_s) for student in self.students),
                                 *(teacher.wait_ready(timeout_s) for teacher in self.teachers.values()))
        self.loop.run(both())

    def check_student_servers(self, worker_urls: Sequence[str], require_deterministic: bool = True
                              ) -> dict[str, bool | None]:
        """With ``seeded``: every student worker must run with ``--enable-deterministic-inference``.

        Reads ``enable_deterministic_inference`` from each worker's ``/server_info`` (SGLang
        0.5.23 reports every server argument there, flat: srt/utils/common.py:3584-3593).
        A worker that has it off raises :class:`ServerSetupError` (``require_deterministic``)
        or logs a warning; one that does not report it is warned about. Returns url -> the flag
        (None: not reported); nothing is checked or returned without ``seeded``.
        """
        if not self.seeded:
            return {}
        from ..rollout.client import SGLangClient

        async def flags() -> list[Any]:
            async def one(url: str) -> Any:
                async with SGLangClient(url, api_key=self.student.api_key, timeout_s=30.0, max_retries=2) as client:
                    info = await client.server_info()
                return info.get("enable_deterministic_inference") if isinstance(info, dict) else None
            return list(await asyncio.gather(*(one(u) for u in worker_urls)))

        found = dict(zip(worker_urls, self.loop.run(flags())))
        off = [url for url, flag in found.items() if flag is False]
        unknown = [url for url, flag in found.items() if flag is None]
        if off:
            message = (f"rollout.seeded is on, but the student server(s) {', '.join(off)} run without "
                       f"--enable-deterministic-inference, so SGLang ignores sampling_seed and a resumed run would "
                       f"draw different responses. Restart them with --enable-deterministic-inference "
                       f"(launch/sglang_servers.sh passes it with SEEDED=1), or set rollout.seeded=false "
                       f"(unseeded sampling), or rollout.require_deterministic=false to go on with this warning")
            if require_deterministic:
                raise ServerSetupError(message)
            logger.warning("%s", message)
        if unknown:
            logger.warning("rollout.seeded is on, but the student server(s) %s do not report "
                           "enable_deterministic_inference in /server_info: whether they honour sampling_seed is "
                           "unknown", ", ".join(unknown))
        return found

    def teacher_model_info(self, name: str = DEFAULT_TEACHER) -> dict[str, Any] | None:
        """Teacher ``name``'s server's ``/model_info`` (None, with a warning, when it cannot be read)."""
        try:
            return self.loop.run(self.teachers[name].model_info(), timeout=60)
        except Exception as exc:
            logger.warning("reading /model_info of the teacher %s failed: %s: %s", self.teacher_urls[name],
                           type(exc).__name__, exc)
            return None

    # ------------------------------------------------------------------ one step
    def collect(self, step: int, records: Sequence[Any], refill: Refill | None = None) -> RolloutBatch:
        """Rollouts, teacher log-probs and rewards for ``records`` (PromptRecord), refilled to
        ``refill.target`` informative groups when given; raises EngineFailure."""
        return self.loop.run(self._collect_step(step, list(records), refill))

    def submit(self, step: int, records: Sequence[Any], refill: Refill | None = None) -> "Future[RolloutBatch]":
        """:meth:`collect` without waiting; cancelling the future cancels every request of the step."""
        return self.loop.submit(self._collect_step(step, list(records), refill))

    async def _collect_step(self, step: int, records: list[Any], refill: Refill | None) -> RolloutBatch:
        if refill is None:
            return await self._collect(step, records)
        return await self._collect_refilled(step, records, refill)

    async def _collect_refilled(self, step: int, records: list[Any], refill: Refill) -> RolloutBatch:
        """Rounds of :meth:`_collect` until ``refill.target`` informative groups are in or the
        rounds run out; uniform groups are dropped here and counted."""
        kept: list[list[Trajectory]] = []
        timings: dict[str, float] = {}
        drawn = uniform = rounds = 0
        first_draw = len(records)
        while True:
            batch = await self._collect(step, records, refill_round=rounds)
            drawn += len(records)
            for key, value in batch.timings.items():  # seconds and counters add up over the rounds
                timings[key] = timings.get(key, 0.0) + value
            dropped = uniform_groups(batch.trajectories)
            uniform += len(dropped)
            groups: dict[int, list[Trajectory]] = {}
            for t in batch.trajectories:
                groups.setdefault(t.group, []).append(t)
            kept.extend(members for gi, members in sorted(groups.items()) if gi not in dropped)
            missing = refill.target - len(kept)
            if missing <= 0 or rounds >= refill.max_rounds:
                break
            rounds += 1
            keep_rate = max(len(kept), 1) / drawn
            records = refill.draw(min(refill.target, math.ceil(missing / keep_rate)))
            logger.info("step %d: %d of %d groups informative after %d prompts; refill round %d draws %d more",
                        step, len(kept), refill.target, drawn, rounds, len(records))
        if len(kept) < refill.target:
            logger.warning("step %d: %d of %d groups informative after %d refill rounds (%d prompts drawn): the "
                           "step trains on fewer (algorithm.refill_max_rounds)", step, len(kept), refill.target,
                           rounds, drawn)
        timings.update({"data/refill_rounds": float(rounds), "data/refill_prompts": float(drawn - first_draw),
                        "data/refill_uniform_groups": float(uniform),
                        "data/refill_surplus_groups": float(max(0, len(kept) - refill.target)),
                        "data/refill_missing_groups": float(max(0, refill.target - len(kept)))})
        return RolloutBatch(step=step, trajectories=_regroup(kept[:refill.target]), timings=timings)

    async def _collect(self, step: int, records: list[Any], refill_round: int = 0) -> RolloutBatch:
        from ..rollout.client import SGLangError
        from ..rollout.rewards import RewardResult

        start = time.monotonic()
        marks = {"generate_end": start, "teacher_first": None, "teacher_end": start, "reward_end": start}
        masked = [0]  # teacher top-k entries outside the student's vocabulary, this step

        async def generate(gi: int, rec: Any, sample: int):
            sampling = self.sampling
            if self.seeded:
                sampling = sampling.replace(sampling_seed=sampling_seed(self.seed, step, rec.index, sample,
                                                                          refill_round))
            worker = gi % len(self.students)  # a group's samples on one worker
            try:
                result = await self.students[worker].generate(rec.prompt_ids, sampling, return_logprob=True)
            except SGLangError as exc:
                raise EngineFailure(f"student engine {self.student_urls[worker]} failed while generating "
                                    f"(step {step}): {exc}") from exc
            if result.aborted:
                raise EngineFailure(f"student engine {self.student_urls[worker]} aborted a request (step {step}): "
                                    f"{result.finish_reason.message or result.finish_reason.raw}")
            marks["generate_end"] = max(marks["generate_end"], time.monotonic())
            return result

        async def score(rec: Any, result: Any) -> tuple[list[float], list[list[int]], list[list[float]]]:
            """Teacher log-probs of the response tokens, and its top-k ids / log-probs per token."""
            if not result.output_ids:
                return [], [], []
            if marks["teacher_first"] is None:
                marks["teacher_first"] = time.monotonic()
            name = self.teacher_of(rec)
            url = self.teacher_urls[name] if len(self.teachers) == 1 else f"{name!r} {self.teacher_urls[name]}"
            try:
                scored = await self.teachers[name].score(rec.prompt_ids, result.output_ids,
                                                         top_logprobs_num=self.teacher_topk)
            except SGLangError as exc:
                raise EngineFailure(f"teacher engine {url} failed while scoring (step {step}): {exc}") from exc
            marks["teacher_end"] = max(marks["teacher_end"], time.monotonic())
            ids: list[list[int]] = []
            logprobs: list[list[float]] = []
            rows = scored.top_logprobs or []
            # the one check of the top-k rows' shape: the batching trusts what comes from here
            if self.teacher_topk and len(rows) != len(result.output_ids):
                raise EngineFailure(f"teacher engine {url} (step {step}): the teacher's top-k must have "
                                    f"{len(result.output_ids)} rows of {self.teacher_topk} ids and log-probs, "
                                    f"got {len(rows)} rows")
            for j, row in enumerate(rows):
                if len(row) != self.teacher_topk or any(not math.isfinite(lp) or lp > 1e-4 for _, lp in row):
                    raise EngineFailure(f"teacher engine {url} returned a malformed top-{self.teacher_topk} "
                                        f"row for response token {j} (step {step}): {row[:4]}...")
                row_ids, row_lps = [int(i) for i, _ in row], [float(lp) for _, lp in row]
                if self.student_vocab_size is not None:
                    masked[0] += mask_topk_row(row_ids, row_lps, self.student_vocab_size)
                ids.append(row_ids)
                logprobs.append(row_lps)
            return scored.token_logprobs, ids, logprobs

        async def sample_and_score(tg: asyncio.TaskGroup, gi: int, rec: Any, sample: int):
            result = await generate(gi, rec, sample)
            return result, tg.create_task(score(rec, result))  # teacher starts now, overlapping generation

        async def group(tg: asyncio.TaskGroup, gi: int, rec: Any) -> list[Trajectory]:
            pairs = await asyncio.gather(*(sample_and_score(tg, gi, rec, s) for s in range(self.group_size)))
            results = [r for r, _ in pairs]
            texts = [r.text if r.text is not None else self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
                     for r in results]
            truncated = [r.truncated for r in results]
            if self.reward_function is not None:
                rewards = [RewardResult(float(self.reward_function(text, rec.answer, trunc)), "custom")
                           for text, trunc in zip(texts, truncated)]
                rewards = [RewardResult(r.reward, "correct" if r.reward > 0.5 else "wrong") for r in rewards]
            else:
                rewards = await self.reward_pool.score_async(texts, [rec.answer] * len(texts), truncated)
            marks["reward_end"] = max(marks["reward_end"], time.monotonic())
            teacher = [await t for _, t in pairs]
            # tensor-backed as each group completes: the broadcast then copies memory instead of
            # converting every token list of the batch at once (rollout.batch_transport)
            return [tensor_backed(Trajectory(group=gi, prompt_index=rec.index, sample=s, prompt_ids=list(rec.prompt_ids),
                               response_ids=list(r.output_ids), rollout_logprobs=list(r.output_logprobs or []),
                               teacher_logprobs=list(lp), reward=float(rw.reward), reward_status=rw.status,
                               finish=r.finish_reason.type, weight_version=r.weight_version, teacher_topk_ids=ids,
                               teacher_topk_logprobs=top, teacher=self.teacher_of(rec)))
                    for s, (r, (lp, ids, top), rw) in enumerate(zip(results, teacher, rewards))]

        try:
            async with asyncio.TaskGroup() as tg:
                group_tasks = [tg.create_task(group(tg, gi, rec)) for gi, rec in enumerate(records)]
        except BaseExceptionGroup as eg:
            first = first_leaf(eg, prefer=EngineFailure)
            raise first from None
        trajectories = [t for task in group_tasks for t in task.result()]
        end = time.monotonic()
        generate_end = marks["generate_end"]
        timings = {
            "time/generate": generate_end - start,
            "time/teacher_total": (marks["teacher_end"] - marks["teacher_first"]) if marks["teacher_first"] else 0.0,
            "time/teacher_tail": max(0.0, marks["teacher_end"] - generate_end),
            "time/reward_tail": max(0.0, marks["reward_end"] - generate_end),
            "time/rollout": end - start,
        }
        if self.teacher_topk:  # a counter, merged into the step's metrics with the timings
            timings["teacher/topk_masked"] = float(masked[0])
        return RolloutBatch(step=step, trajectories=trajectories, timings=timings)

