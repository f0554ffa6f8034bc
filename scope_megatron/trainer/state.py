"""What a run has done so far, checkpointed whole, and how it stops.

:class:`RunState` is the loop's progress (step, skip counters, the prompt sampler's position); a
checkpoint stores :meth:`RunState.state_dict` and a resumed run continues from it exactly.
:class:`StopRequest` is the flag that SIGTERM / Ctrl-C and ``RUN_DIR/STOP`` set, agreed by every
rank at a step boundary.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_FILE = "STOP"  # RUN_DIR/STOP: checkpoint and exit 0 at the next step boundary (removed when honoured)


class TrainingAborted(RuntimeError):
    """The run cannot continue (engine failure, failed sync, too many bad steps)."""


@dataclass
class RunState:
    """The loop's progress. ``step`` and the counters are the same on every rank; the prompt
    sampler and a batch generated ahead exist on rank 0 only (it draws the prompts and drives
    the engines) and are ``None`` elsewhere."""

    step: int = 0                   # the last completed step
    nonfinite_steps: int = 0        # steps skipped for NaN/inf log-probs, loss or gradients
    empty_steps_total: int = 0      # steps whose every group was filtered out
    empty_steps_in_a_row: int = 0
    sampler: Any = None             # rollout.data.PromptSampler (rank 0)
    # rollout.max_staleness >= 1 (rank 0): the next step's batch, generated during this step
    pending_batch: Any = None       # rollout.types.RolloutBatch | None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "nonfinite_steps": self.nonfinite_steps,
                                 "empty_steps_total": self.empty_steps_total,
                                 "empty_steps_in_a_row": self.empty_steps_in_a_row}
        if self.sampler is not None:
            state["sampler"] = self.sampler.state_dict()
        if self.pending_batch is not None:
            state["pending_batch"] = self.pending_batch
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.empty_steps_total = int(state.get("empty_steps_total", 0))
        self.empty_steps_in_a_row = int(state.get("empty_steps_in_a_row", 0))
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
        self.pending_batch = state.get("pending_batch") if self.sampler is not None else None

    def count_nonfinite(self, step: int, why: str, limit: int) -> None:
        """A step skipped for NaN/inf; more than ``limit`` (faults.max_nonfinite_steps) abort the run."""
        self.nonfinite_steps += 1
        logger.warning("step %d skipped: %s (%d NaN/inf steps so far)", step, why, self.nonfinite_steps)
        if self.nonfinite_steps > limit:
            raise TrainingAborted(f"{self.nonfinite_steps} steps with NaN/inf loss or gradients "
                                  f"(faults.max_nonfinite_steps = {limit})")

    def count_empty(self, step: int, num_trajectories: int, limit: int) -> None:
        """A step with nothing to train on; ``limit`` (faults.max_empty_steps) in a row abort the run."""
        self.empty_steps_in_a_row += 1
        self.empty_steps_total += 1
        logger.warning("step %d: every group was filtered out (%d trajectories); step skipped", step,
                       num_trajectories)
        if self.empty_steps_in_a_row >= limit:
            raise TrainingAborted(f"{self.empty_steps_in_a_row} consecutive steps had no usable trajectory "
                                  f"(faults.max_empty_steps = {limit})")


@dataclass
class StopRequest:
    """A request to stop: a signal on any rank or ``RUN_DIR/STOP`` on rank 0.

    The signal handler only sets the flag; :meth:`agreed` (a collective at each step boundary)
    makes every rank stop at the same step. A second Ctrl-C raises KeyboardInterrupt at once."""

    run_dir: Path
    is_controller: bool
    signum: int | None = None
    reason: str | None = None      # a signal's name, the STOP file, or another rank's stop
    abandoned_step: int | None = None  # a step whose rollouts were abandoned by the stop

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum, self.reason = signum, signal.Signals(signum).name
            logger.warning("received %s: stopping (rollouts in flight are abandoned, a step in training or "
                           "sync finishes first; then checkpoint, engines stopped)", self.reason)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def set_by_other_rank(self) -> None:
        if self.signum is None:
            self.signum, self.reason = signal.SIGTERM, "another rank's stop"

    def remove_stale_file(self) -> None:
        """A STOP file left by a run that ended before honouring it: this run starts normally."""
        stale = self.run_dir / STOP_FILE
        if stale.exists():
            logger.warning("removing %s left from an earlier run (create it again to stop this run)", stale)
            stale.unlink(missing_ok=True)

    def agreed(self, group: Any) -> bool:
        """Every rank's flag (and rank 0's STOP file), agreed over ``group`` (a collective)."""
        if self.is_controller and self.signum is None and (self.run_dir / STOP_FILE).exists():
            logger.warning("%s exists: stopping (checkpoint, engines stopped)", self.run_dir / STOP_FILE)
            self.signum, self.reason = signal.SIGTERM, STOP_FILE
        flag = torch.tensor([1 if self.signum is not None else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if int(flag.item()):
            self.set_by_other_rank()
        return bool(flag.item())

    def honoured(self) -> None:
        """The run stopped and checkpointed: a STOP file is removed so a resumed run continues."""
        if self.is_controller and self.reason == STOP_FILE:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
