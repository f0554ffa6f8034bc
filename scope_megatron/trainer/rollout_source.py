"""Where a step's batch comes from: rank 0 draws the prompts and has them generated and scored
(or, for sft / kd, takes the records' solutions), then every rank receives the batch.

With ``data.replay`` the batch is instead read from a run's saved rollouts
(:mod:`..rollout.replay`): no engine, no sampler.

A stop requested while rank 0 waits for generation (the longest phase) abandons the step at once:
the in-flight requests are cancelled and the prompt sampler is rewound, so a resumed run draws
the same prompts. Any failure on rank 0 reaches the other ranks as a message instead of leaving
them waiting.

With ``rollout.max_staleness`` N >= 1 generation runs one batch ahead: as soon as step t's batch
is handed out, rank 0 submits step t+1's prompts to the engines, which still serve the weights
of step t-1, and the trainers train on batch t meanwhile. Before the weight update of step t
rank 0 waits for batch t+1 (the engines must be idle for an update), so every batch but the
first is exactly one version behind the policy that trains on it; a batch more than N versions
behind (possible only when a sync was skipped, e.g. a NaN step) is regenerated. The finished
batch t+1 is part of the run state and is stored in step t's checkpoint, so a resumed run trains
on exactly the batch the uninterrupted run would have (it cannot regenerate it: the weights of
step t-1 are gone). A stop while batch t+1 is still generating cancels it and rewinds the
sampler; the resumed run then generates it from the weights of step t.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError, Future, TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..rollout.batch_transport import RolloutMessage, broadcast_rollout_message
from ..rollout.replay import read_rollouts, resolve_replay_dir, write_rollouts
from ..rollout.types import RolloutBatch, Trajectory
from .controller import EngineFailure, Refill
from .state import RunState, StopRequest, TrainingAborted

logger = logging.getLogger(__name__)

_POLL_S = 0.2  # how often rank 0 looks at the stop flag while rollouts are in flight


@dataclass
class _Inflight:
    """A generation running ahead: its step, the sampler before its prompts, its wall times."""

    step: int
    sampler_state: dict[str, Any]
    started: float
    future: Future
    finished: float | None = None


def _wait_unless_stopped(future: Future, stop: StopRequest) -> RolloutBatch | None:
    """The future's batch, or None (every request cancelled) as soon as a stop is requested."""
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except FutureTimeout:
            if stop.requested:
                future.cancel()  # cancels the step's task group on the client loop: requests closed
                try:
                    future.result(timeout=10)
                except (CancelledError, FutureTimeout, Exception):
                    pass
                return None


class RolloutSource:
    """One batch per step on every rank (rank 0 produces it)."""

    def __init__(self, cfg: Config, *, state: RunState, stop: StopRequest, control_group: Any,
                 is_controller: bool, dataset: Any = None, tokenizer: Any = None, controller: Any = None,
                 on_abandon: Callable[[], None] | None = None, vocab_size: int = 0, teacher_topk: int = 0):
        self.cfg = cfg
        self.state = state            # rank 0: its sampler draws the prompts
        self.stop = stop
        self.control_group = control_group
        self.is_controller = is_controller
        self.dataset = dataset        # rank 0 only (None in a replay)
        self.tokenizer = tokenizer    # rank 0 only
        self.controller = controller  # rank 0 only, None for sft / kd and replays
        self.on_abandon = on_abandon  # releases the engines still busy with cancelled requests
        self.save_dir = Path(cfg.run_dir) / "rollouts" if cfg.logging.save_rollouts else None
        # data.replay: every step's batch is read from the saved rollouts instead
        self.replay_dir = resolve_replay_dir(cfg.data.replay) if cfg.data.replay else None
        self.vocab_size = vocab_size      # a replayed batch's ids must fit the student
        self.teacher_topk = teacher_topk  # and its top-k rows the objective's k
        self.max_staleness = cfg.rollout.max_staleness
        self.last_step = cfg.steps
        # asynchronous mode, rank 0: the next step's generation in flight
        self._inflight: _Inflight | None = None
        self._prefetch_error: str | None = None  # a failed prefetch, reported when its step asks
        self._waited = 0.0           # seconds the trainer waited for this step's batch
        self._wait_started = 0.0
        self._generation: tuple[float, float] | None = None  # (start, end) of the last finished prefetch

    def collect(self, step: int, engine_version: int) -> RolloutBatch | None:
        """The step's batch on every rank; ``None`` on every rank when a stop abandoned it.

        Asynchronous mode (rank 0): the prefetched batch when there is one, and the next step's
        generation is started before this returns."""
        message = None
        if self.is_controller:
            self._wait_started = time.monotonic()
            status, value = (self._take_prefetched if self.max_staleness > 0 else self._produce)(step, engine_version)
            self._waited = time.monotonic() - self._wait_started
            message = (RolloutMessage.ok(value) if status == "ok" else RolloutMessage.stop() if status == "stop"
                       else RolloutMessage.error(value))
        # flat typed tensors, not a pickle of every token list (rollout.batch_transport)
        message = broadcast_rollout_message(message, src=0, group=self.control_group)
        if message.status == "stop":
            self.stop.abandoned_step = step
            self.stop.set_by_other_rank()
            return None
        if message.status != "ok":
            raise TrainingAborted(message.message)
        return message.batch

    # ------------------------------------------------------------------ asynchronous mode (rank 0)
    def _take_prefetched(self, step: int, engine_version: int) -> tuple[str, Any]:
        """This step's batch from the prefetch (or generated now), then the next step submitted."""
        pending = self.state.pending_batch
        self.state.pending_batch = None
        if pending is None and self._inflight is not None:  # the caller skipped finish_prefetch
            self.finish_prefetch()
            pending, self.state.pending_batch = self.state.pending_batch, None
        if self._prefetch_error is not None:
            error, self._prefetch_error = self._prefetch_error, None
            return ("error", error)
        if pending is not None and pending.step != step:
            logger.warning("step %d: the stored batch is for step %d; generating again", step, pending.step)
            pending = None
        if pending is not None:
            behind = pending.versions_behind(policy_version=step - 1)
            if behind and max(behind) > self.max_staleness:
                logger.warning("step %d: the prefetched batch is %d versions behind (rollout.max_staleness = %d); "
                               "generating again", step, max(behind), self.max_staleness)
                pending = None
        result = ("ok", pending) if pending is not None else self._produce(step, engine_version)
        if result[0] == "ok" and step < self.last_step and not self.stop.requested:
            self._submit_next(step + 1)
        return result

    def _submit_next(self, step: int) -> None:
        sampler_state = self.state.sampler.state_dict()
        records = [self.dataset[i] for i in self.state.sampler.next_indices(self.cfg.rollout.prompts_per_step)]
        logger.info("step %d: generating rollouts of %d prompts x %d ahead (while step %d trains)", step,
                    len(records), self.cfg.rollout.group_size, step - 1)
        inflight = _Inflight(step=step, sampler_state=sampler_state, started=time.monotonic(),
                             future=self.controller.submit(step, records, self._refill()))
        inflight.future.add_done_callback(lambda _: setattr(inflight, "finished", time.monotonic()))
        self._inflight = inflight

    def finish_prefetch(self) -> float:
        """Rank 0, asynchronous mode, before a weight update: wait until the batch generating
        ahead is done and keep it for its step (:attr:`RunState.pending_batch`); a stop cancels it
        and rewinds the sampler. Returns the seconds waited (0 elsewhere)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return 0.0
        t0 = time.monotonic()
        try:
            batch = _wait_unless_stopped(inflight.future, self.stop)
        except Exception as exc:  # reported when its step asks for it, on every rank at once
            batch = None
            self._prefetch_error = (str(exc) if isinstance(exc, EngineFailure) else
                                    f"rollout failed at step {inflight.step}: {type(exc).__name__}: {exc}")
        if batch is None and self._prefetch_error is None:  # stopped: a resumed run draws them again
            self.state.sampler.load_state_dict(inflight.sampler_state)
            logger.warning("step %d: rollouts generating ahead abandoned (%s)", inflight.step, self.stop.reason)
        elif batch is not None:
            self.state.pending_batch = batch
            if self.save_dir is not None:
                self._save(batch)
        self._generation = (inflight.started, inflight.finished or time.monotonic())
        return time.monotonic() - t0

    def overlap_metrics(self, train_start: float, train_end: float, step_start: float,
                        step_end: float) -> dict[str, float]:
        """Rank 0: how the generation of the next batch and the training of this one overlapped.

        ``overlap/fraction`` is the share of the shorter of the two that ran concurrently with
        the other; the idle times are each side's part of the step without work (the trainer's
        waits for rollouts; the step's wall time minus the engines' generation time)."""
        metrics = {"overlap/trainer_wait_s": self._waited}
        if self._generation is None:
            return metrics
        g0, g1 = self._generation
        self._generation = None
        generation, training = g1 - g0, train_end - train_start
        both = max(0.0, min(g1, train_end) - max(g0, train_start))
        metrics.update({"overlap/generation_s": generation, "overlap/training_s": training,
                        "overlap/concurrent_s": both,
                        "overlap/fraction": both / max(min(generation, training), 1e-9),
                        "overlap/engine_idle_s": max(0.0, (step_end - step_start) - generation)})
        return metrics

    # ------------------------------------------------------------------ producing a batch (rank 0)
    def _produce(self, step: int, engine_version: int) -> tuple[str, Any]:
        """Rank 0: ("ok", batch), ("stop", None) or ("error", message)."""
        if self.replay_dir is not None:
            t0 = time.monotonic()
            try:
                batch = read_rollouts(self.replay_dir, step, vocab_size=self.vocab_size, teacher_topk=self.teacher_topk)
            except (OSError, ValueError) as exc:
                return ("error", f"data.replay, step {step}: {exc}")
            batch.timings["time/rollout"] = time.monotonic() - t0
            logger.info("step %d: replaying %d trajectories from %s", step, len(batch.trajectories), self.replay_dir)
            return ("ok", batch)
        sampler = self.state.sampler
        sampler_state = sampler.state_dict()
        records = [self.dataset[i] for i in sampler.next_indices(self.cfg.rollout.prompts_per_step)]
        try:
            if self.controller is None:
                result = ("ok", self._supervised_batch(step, records, engine_version))
            else:
                batch = self._generate_unless_stopped(step, records)
                result = ("ok", batch) if batch is not None else ("stop", None)
        except Exception as exc:  # anything on rank 0 must not leave the others waiting
            if self.stop.requested:  # e.g. the signal also reached the engines
                result = ("stop", None)
            elif isinstance(exc, EngineFailure):
                result = ("error", str(exc))
            else:
                result = ("error", f"rollout failed at step {step}: {type(exc).__name__}: {exc}")
        if result[0] == "stop":
            sampler.load_state_dict(sampler_state)  # a resumed run draws these prompts again
            logger.warning("step %d: rollouts abandoned (%s)", step, self.stop.reason)
            if self.on_abandon is not None:  # busy engines would slow the checkpoint down
                self.on_abandon()
        elif result[0] == "ok" and self.save_dir is not None:
            self._save(result[1])
        return result

    def _generate_unless_stopped(self, step: int, records: list[Any]) -> RolloutBatch | None:
        """The controller's collection, cancelled (every in-flight request) as soon as a stop is
        requested; None then."""
        if self.stop.requested:
            return None
        logger.info("step %d: collecting rollouts of %d prompts x %d", step, len(records), self.cfg.rollout.group_size)
        return _wait_unless_stopped(self.controller.submit(step, records, self._refill()), self.stop)

    def _refill(self) -> Refill | None:
        """With ``algorithm.refill_filtered_groups``: more prompts from the run's sampler, so a
        rewind (a stop) or a checkpoint covers them too. They are drawn on the controller's event
        loop while the main thread waits or trains, which never touches the sampler then."""
        if not self.cfg.algorithm.refill_filtered_groups:
            return None
        sampler = self.state.sampler
        return Refill(target=self.cfg.rollout.prompts_per_step, max_rounds=self.cfg.algorithm.refill_max_rounds,
                      draw=lambda n: [self.dataset[i] for i in sampler.next_indices(n)])

    def _supervised_batch(self, step: int, records: list[Any], engine_version: int) -> RolloutBatch:
        """sft / kd: each record's solution (+ eos) is the response; reward 1 (the MLE path)."""
        t0 = time.monotonic()
        eos = self.tokenizer.eos_token_id
        key = self.cfg.data.solution_key
        trajectories = []
        for gi, rec in enumerate(records):
            ids = list(self.tokenizer(rec.extra[key], add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
            trajectories.append(Trajectory(group=gi, prompt_index=rec.index, sample=0, prompt_ids=list(rec.prompt_ids),
                                           response_ids=ids, rollout_logprobs=[], teacher_logprobs=[0.0] * len(ids),
                                           reward=1.0, reward_status="correct", finish="stop",
                                           weight_version=str(engine_version)))
        return RolloutBatch(step=step, trajectories=trajectories, timings={"time/rollout": time.monotonic() - t0})

    def _save(self, batch: RolloutBatch) -> None:
        """RUN_DIR/rollouts/step_N.jsonl (:func:`..rollout.replay.write_rollouts`)."""
        write_rollouts(self.save_dir, batch)
