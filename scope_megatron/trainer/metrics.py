"""Per-step observability on rank 0: TensorBoard scalars, ``metrics.jsonl``, a tqdm bar, a log line.

Every scalar of a step goes to TensorBoard under its tag (``docs/training.md`` lists them all)
and, with the same names, to one JSON line of ``RUN_DIR/metrics.jsonl`` (step included), which
is what tests and scripts read.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# dense bf16 peak TFLOPS per device, by substring of the CUDA device name
_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
                ("L40S", 362.0), ("A10", 125.0), ("V100", 125.0), ("B200", 2250.0), ("GB200", 2500.0))
CPU_NOMINAL_TFLOPS = 0.1


def peak_tflops(configured: float | None) -> float:
    """Peak TFLOPS of one device: the configured value, the GPU's bf16 dense peak, or a CPU nominal."""
    if configured:
        return float(configured)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in _PEAK_TFLOPS:
            if key in name:
                return value
        logger.warning("unknown GPU %r: MFU uses 989 TFLOPS; set logging.peak_tflops", name)
        return 989.0
    return CPU_NOMINAL_TFLOPS


def training_flops(num_params: int, train_tokens: int, forward_tokens: int, updates: int) -> float:
    """6 N T per update (forward + backward) plus 2 N T for the old-log-prob forward pass."""
    return 6.0 * num_params * train_tokens * updates + 2.0 * num_params * forward_tokens


class MetricsLogger:
    """Writes step metrics on rank 0 (no-op elsewhere)."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, use_tqdm: bool = True,
                 total_steps: int = 0, start_step: int = 0):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if use_tqdm:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="scope", unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=not sys.stderr.isatty())

    def log(self, step: int, metrics: dict[str, Any], count_step: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in clean.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else str(v))
                                                          for k, v in clean.items()}}) + "\n")
            self.jsonl.flush()
        if self.bar is not None and count_step:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{clean.get('loss/total', float('nan')):.4g}",
                                 acc=f"{clean.get('reward/accuracy', float('nan')):.2f}",
                                 t=f"{clean.get('time/step', 0.0):.1f}s")
        logger.info("%s", format_line(step, clean) if count_step else
                    f"step {step} | " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(clean.items())))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()


def format_line(step: int, m: dict[str, float]) -> str:
    """One readable line per step."""
    def g(key: str, fmt: str = ".4g") -> str:
        value = m.get(key)
        return "-" if value is None else format(value, fmt)

    return (f"step {step} | loss {g('loss/total')} (mle {g('loss/mle')}, kl {g('loss/kl')}) | "
            f"acc {g('reward/accuracy', '.3f')} | len {g('response/length_mean', '.1f')} "
            f"trunc {g('response/truncation_rate', '.2f')} | gnorm {g('train/grad_norm')} lr {g('train/lr', '.3g')} | "
            f"k1 {g('kl/sampled_k1')} mismatch {g('mismatch/abs', '.3g')} | "
            f"time {g('time/step', '.2f')}s (gen {g('time/generate', '.2f')}, teacher tail {g('time/teacher_tail', '.2f')}, "
            f"old-lp {g('time/old_logprobs', '.2f')}, train {g('time/train', '.2f')}, sync {g('time/sync', '.2f')}) | "
            f"{g('perf/tokens_per_s', '.1f')} tok/s mfu {g('perf/mfu', '.3f')}"
            + "".join(f" | {k} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("eval/mean/avg@")))
