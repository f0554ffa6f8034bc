"""The metrics of one step: timings, what the batch held, what the update and the sync did,
throughput and MFU. Every name here is a TensorBoard tag and a ``metrics.jsonl`` key
(docs/training.md lists them)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..rollout.rewards import STATUSES
from ..rollout.types import RolloutBatch, Trajectory
from .metrics import peak_tflops, training_flops

logger = logging.getLogger(__name__)

PADDING_HINT_FRACTION = 0.25  # above this padding fraction (padded micro-batches), suggest packing once


@dataclass
class StepTimer:
    """Wall time of a step and of its phases (``time/<phase>``)."""

    start: float = field(default_factory=time.monotonic)
    seconds: dict[str, float] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # phase -> (first start, last end)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            t1 = time.monotonic()
            self.seconds[f"time/{phase}"] = self.seconds.get(f"time/{phase}", 0.0) + t1 - t0
            self.spans[phase] = (self.spans.get(phase, (t0, t1))[0], t1)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def batch_metrics(batch: RolloutBatch, *, engine_version: int, policy_version: int,
                  per_teacher: bool = False) -> dict[str, float]:
    """Rewards, lengths and staleness of the step's rollouts (before any filtering).

    ``rollout/stale_fraction``: trajectories not from the weights the engines serve now;
    ``rollout/staleness_*``: how many versions each trajectory is behind ``policy_version``
    (the weights that train on it), when the engines report step numbers as versions.
    ``per_teacher`` (several teachers): :func:`teacher_metrics` too."""
    trajs = batch.trajectories
    n = max(len(trajs), 1)
    lengths = [len(t.response_ids) for t in trajs] or [0]
    metrics = dict(batch.timings)
    metrics.update({
        "reward/mean": sum(t.reward for t in trajs) / n,
        "reward/accuracy": sum(t.correct for t in trajs) / n,
        "response/length_mean": sum(lengths) / len(lengths),
        "response/length_max": max(lengths),
        "response/length_min": min(lengths),
        "response/truncation_rate": sum(t.truncated for t in trajs) / n,
        "prompt/length_mean": sum(len(t.prompt_ids) for t in trajs) / n,
        "rollout/trajectories": len(trajs),
        "rollout/stale_fraction": sum(t.weight_version != str(engine_version) for t in trajs) / n,
    })
    behind = batch.versions_behind(policy_version)
    if behind:
        metrics["rollout/staleness_mean"] = sum(behind) / len(behind)
        metrics["rollout/staleness_max"] = max(behind)
    for status in STATUSES:
        metrics[f"reward/status_{status}"] = sum(t.reward_status == status for t in trajs) / n
    if "time/generate" in batch.timings:  # sft / kd and replays generate nothing
        metrics["perf/rollout_tokens_per_s"] = sum(lengths) / max(batch.timings["time/generate"], 1e-9)
    if per_teacher:
        metrics.update(teacher_metrics(trajs))
    return metrics


def teacher_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Per teacher NAME that scored some of ``trajectories``: ``teacher/NAME/groups`` (prompts
    routed to it), ``accuracy`` (of their responses), ``ppl`` (the teacher's perplexity of the
    responses, exp of minus its mean log-prob per response token) and ``kl`` (the sampled-token
    reverse-KL estimate, mean of lp_rollout - lp_teacher per response token, with the engine's
    rollout log-probs; absent when the engine sent none)."""
    by_teacher: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        by_teacher.setdefault(t.teacher, []).append(t)
    out: dict[str, float] = {}
    for name, members in sorted(by_teacher.items()):
        prefix = f"teacher/{name}"
        out[f"{prefix}/groups"] = float(len({t.group for t in members}))
        out[f"{prefix}/accuracy"] = sum(t.correct for t in members) / len(members)
        teacher_lps = [lp for t in members for lp in t.teacher_logprobs]
        if teacher_lps:
            out[f"{prefix}/ppl"] = math.exp(min(-sum(teacher_lps) / len(teacher_lps), 700.0))  # no OverflowError
        pairs = [(r, q) for t in members if len(t.rollout_logprobs) == len(t.teacher_logprobs)
                 for r, q in zip(t.rollout_logprobs, t.teacher_logprobs)]
        if pairs:
            out[f"{prefix}/kl"] = sum(r - q for r, q in pairs) / len(pairs)
    return out


class StepRecorder:
    """Turns what a step produced into its metrics dict (the same keys on every rank)."""

    def __init__(self, *, num_parameters: int, world_size: int, updates_per_batch: int,
                 configured_peak_tflops: float | None, is_controller: bool, packing: bool):
        self.num_parameters = num_parameters
        self.world_size = world_size
        self.updates_per_batch = updates_per_batch
        self.peak_flops = peak_tflops(configured_peak_tflops) * 1e12 * world_size  # all trainer ranks
        self.is_controller = is_controller
        self.packing = packing
        self._padding_hint_given = False

    def data_metrics(self, step: int, data: Any) -> dict[str, float]:
        """What filtering and micro-batching did (``data`` is the step's StepData)."""
        if (self.is_controller and not self._padding_hint_given and not self.packing
                and data.padding_fraction > PADDING_HINT_FRACTION):
            self._padding_hint_given = True
            logger.info("step %d: %.0f%% of the trained positions are padding; packed micro-batches avoid it "
                        "(set parallel.max_tokens_per_microbatch, e.g. the longest prompt + response)", step,
                        100 * data.padding_fraction)
        return {"data/filtered_empty_responses": data.dropped["empty_responses"],
                "data/filtered_uniform_groups": data.dropped["uniform_groups"],
                "train/micro_batches": data.num_micro_batches,
                "train/padding_fraction": data.padding_fraction}

    @staticmethod
    def plan_metrics(plan: Any) -> dict[str, float]:
        return {f"objective/{k}": v for k, v in plan.metrics.items()}

    @staticmethod
    def update_metrics(update: Any) -> dict[str, float]:
        """The first update's loss, gradient norm, LR and objective report (``update`` is an UpdateResult)."""
        first = update.first
        if first is None:
            return {}
        return {**first.report, "loss/total": first.loss, "train/grad_norm": first.grad_norm,
                "train/lr": first.learning_rate, "train/loss_tokens": first.num_loss_tokens}

    @staticmethod
    def sync_metrics(sync: Any) -> dict[str, float]:
        if sync is None:
            return {}
        metrics = {"sync/seconds": sync.seconds, "sync/transfer_seconds": sync.seconds_transfer,
                   "sync/bytes": sync.num_bytes, "sync/tensors": sync.num_tensors}
        if sync.probe_max_abs_diff == sync.probe_max_abs_diff:  # not NaN: the probe ran
            metrics["sync/probe_max_abs_diff"] = sync.probe_max_abs_diff
            metrics["sync/probe_mean_abs_diff"] = sync.probe_mean_abs_diff
        return metrics

    def perf_metrics(self, data: Any, updated: bool, timer: StepTimer) -> dict[str, float]:
        """Tokens/s and MFU over the trainer's ranks (the old-log-prob pass counts as a forward)."""
        tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in data.trajectories)
        step_time = timer.elapsed()
        flops = training_flops(self.num_parameters, tokens, tokens, self.updates_per_batch if updated else 0)
        compute_time = timer.seconds.get("time/old_logprobs", 0.0) + timer.seconds.get("time/train", 0.0)
        return {"perf/tokens_per_s": tokens / max(step_time, 1e-9),
                "perf/mfu": flops / max(step_time * self.peak_flops, 1e-9),
                "perf/train_mfu": flops / max(compute_time * self.peak_flops, 1e-9),
                "perf/tflops_per_device": flops / max(step_time, 1e-9) / self.world_size / 1e12}
