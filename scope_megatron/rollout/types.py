"""The contract between rollouts and training: what one sampled response carries, and one step's batch.

Rank 0's controller (:mod:`scope_megatron.trainer.controller`) builds a :class:`RolloutBatch`
from the student and teacher engines and broadcasts it to every rank
(:mod:`scope_megatron.rollout.batch_transport`: a few flat typed tensors);
:mod:`scope_megatron.trainer.batching` turns it into each rank's micro-batches. The controller
fills the fields with Python lists; on the receiving ranks they are read-only list look-alikes
over the received buffers (``batch_transport.TensorListView``), so code reads them as sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Trajectory:
    """One sampled response with everything the trainer needs (list fields: sequences, see above)."""

    group: int                     # prompt position in this step's batch (0..B-1)
    prompt_index: int              # dataset index of the prompt
    sample: int                    # 0..G-1
    prompt_ids: list[int]          # [P]
    response_ids: list[int]        # [R]
    rollout_logprobs: list[float]  # [R] the student engine's log-probs, or [] when it sent none
    teacher_logprobs: list[float]  # [R]
    reward: float
    reward_status: str
    finish: str                    # stop | length | abort
    weight_version: str | None = None
    # teacher's top-k per response token (only with algorithm.topk_kl): [R][K] ids and log-probs
    teacher_topk_ids: list[list[int]] = field(default_factory=list)
    teacher_topk_logprobs: list[list[float]] = field(default_factory=list)
    teacher: str = "default"       # the teacher that scored it (teacher.routes; config.DEFAULT_TEACHER)

    @property
    def correct(self) -> bool:
        return self.reward > 0.5

    @property
    def truncated(self) -> bool:
        return self.finish == "length"


@dataclass
class RolloutBatch:
    """What rank 0 broadcasts to every rank each step."""

    step: int
    trajectories: list[Trajectory]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, and counters: step metrics

    def versions_behind(self, policy_version: int) -> list[int] | None:
        """Per trajectory, how many weight versions its engine's weights were behind
        ``policy_version`` (the weights that train on it); None when an engine reports versions
        that are not step numbers (SGLang's default version is "default")."""
        try:
            return [policy_version - int(t.weight_version) for t in self.trajectories]
        except (TypeError, ValueError):
            return None
