"""What launchers' signals do to a run: SIGTERM during rollouts, the RUN_DIR/STOP file.

torchrun SIGKILLs its workers 30 s after SIGTERM (torch/distributed/elastic/agent/server/
local_elastic_agent.py:219, ``shutdown_timeout=30``), so a SIGTERM that lands in rollout
generation (the longest phase) must end with the checkpoint written well inside that: the run
abandons the step, saves the last completed step and exits 0. Resuming from that checkpoint
continues exactly like an uninterrupted run (the abandoned prompts are drawn again).
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest

from scope_megatron.trainer.checkpointing import list_checkpoints
from tests.loop_utils import REPO, asset_overrides, loop_env, read_metrics, train_cmd

pytestmark = pytest.mark.timeout(900)  # three tiny runs, two at a time, on a loaded machine

GRACE_S = 20.0  # SIGTERM -> exit with the checkpoint written; torchrun allows 30 s
# one engine request at a time (deterministic log-probs) and long enough answers that generation
# is the longest phase of a step; no periodic checkpoints, so the stop itself must save
COMMON = ("steps=3", "checkpoint.every=0", "checkpoint.keep_last=0", "rollout.max_new_tokens=256",
          "rollout.embedded_max_batch_size=1", "teacher.embedded_max_batch_size=1")



class _Run:
    """A training process whose stderr is read line by line; ``on_line(text)`` may act on a line."""

    def __init__(self, overrides: list[str], on_line=None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(train_cmd(*overrides), cwd=REPO, env=loop_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self._on_line = on_line
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(timeout=10)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def _same_step(a: dict, b: dict, step: int) -> None:
    keys = [k for k in a if not k.startswith(("time/", "perf/", "sync/seconds", "sync/transfer"))]
    assert len(keys) > 60
    for key in keys:
        assert a[key] == b.get(key), (step, key, a[key], b.get(key))


def test_sigterm_during_rollouts_checkpoints_in_grace_and_resume_is_exact(assets, tmp_path):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    sent: dict[str, float] = {}

    def term_in_step_2_rollouts(line: str) -> None:
        if "step 2: collecting rollouts" in line and "t" not in sent:
            time.sleep(0.1)  # inside generation (about a second per step on an idle 2-core machine)
            sent["t"] = time.monotonic()
            interrupted.proc.send_signal(signal.SIGTERM)

    runs: list[_Run] = []
    try:
        reference = _Run([*asset_overrides(assets, full), *COMMON])
        runs.append(reference)
        interrupted = _Run([*asset_overrides(assets, stopped), *COMMON], on_line=term_in_step_2_rollouts)
        runs.append(interrupted)
        rc = interrupted.wait(timeout=600)
        assert "t" in sent, f"rc={rc}\n{interrupted.stderr[-4000:]}"
        elapsed = time.monotonic() - sent["t"]
        assert rc == 0, interrupted.stderr[-4000:]
        assert "step 2: rollouts abandoned (SIGTERM)" in interrupted.stderr, interrupted.stderr[-4000:]
        print(f"SIGTERM during rollouts -> exit with the checkpoint written: {elapsed:.1f} s")
        assert elapsed < GRACE_S, f"{elapsed:.1f} s from SIGTERM to exit (grace {GRACE_S} s)"
        # the checkpoint is the last completed step's, and nothing of step 2 was logged
        assert [s for s, _ in list_checkpoints(stopped / "checkpoints")] == [1]
        assert sorted(read_metrics(stopped)) == [1]

        # resume; a STOP file of an earlier run is cleared at start, one created during step 2 stops
        # the run at the end of step 2 (checkpoint, exit 0, the file removed)
        (stopped / "STOP").write_text("")

        def stop_file_in_step_2(line: str) -> None:
            if "step 2: collecting rollouts" in line:
                (stopped / "STOP").write_text("")

        resumed = _Run([*asset_overrides(assets, stopped), *COMMON, "checkpoint.resume=latest"],
                       on_line=stop_file_in_step_2)
        runs.append(resumed)
        assert resumed.wait(timeout=600) == 0, resumed.stderr[-4000:]
        assert reference.wait(timeout=600) == 0, reference.stderr[-4000:]
        assert "resumed from" in resumed.stderr and "left from an earlier run" in resumed.stderr
        assert "STOP exists: stopping" in resumed.stderr, resumed.stderr[-4000:]
        assert not (stopped / "STOP").exists()
        assert [s for s, _ in list_checkpoints(stopped / "checkpoints")] == [1, 2]
    finally:  # no run outlives a failed assertion
        for run in runs:
            run.kill()

    a, b = read_metrics(full), read_metrics(stopped)
    assert sorted(a) == [1, 2, 3] and sorted(b) == [1, 2]
    for step in (1, 2):  # step 2 drew the prompts the stopped run abandoned, and trained the same
        _same_step(a[step], b[step], step)
