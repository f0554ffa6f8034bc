"""Per-step observability on rank 0: metrics sinks (``metrics.jsonl``, TensorBoard, W&B), a tqdm bar, a log line.

Every scalar of a step goes, as one dict, to every sink (:mod:`scope_megatron.trainer.sinks`):
to TensorBoard under its tag (``docs/training.md`` lists them all), with the same names to one
JSON line of ``RUN_DIR/metrics.jsonl`` (step included), which is what tests and scripts read,
and to the W&B run with ``logging.wandb.enabled``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .sinks import JsonlSink, MetricsSink, TensorBoardSink, sinks_from_config

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


def eval_summary_rows(scalars: dict[str, float]) -> list[dict[str, Any]]:
    """``eval/<benchmark>/<metric>`` scalars as table rows ``{benchmark, metric, value}``, sorted."""
    rows = []
    for key, value in sorted(scalars.items()):
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] == "eval":
            rows.append({"benchmark": "/".join(parts[1:-1]), "metric": parts[-1], "value": value})
    return rows


class MetricsLogger:
    """Writes step metrics on rank 0 (no-op elsewhere): the same scalars to every sink
    (``metrics.jsonl``, TensorBoard, W&B; :mod:`scope_megatron.trainer.sinks`), plus a tqdm bar
    and a log line. A step whose scalars hold ``eval/...`` values also logs the table ``eval/summary``."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, use_tqdm: bool = True,
                 total_steps: int = 0, start_step: int = 0, sinks: list[MetricsSink] | None = None):
        """``sinks`` None: ``metrics.jsonl`` plus TensorBoard if ``tensorboard``; else exactly ``sinks``."""
        self.enabled = enabled
        self.sinks: list[MetricsSink] = []
        self.bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if sinks is None:
            sinks = [JsonlSink(run_dir)] + ([TensorBoardSink(run_dir)] if tensorboard else [])
        self.sinks = list(sinks)
        if use_tqdm:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="scope", unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=not sys.stderr.isatty())

    @classmethod
    def from_config(cls, cfg: Any, run_dir: str | Path, enabled: bool, start_step: int = 0) -> MetricsLogger:
        """The logger ``cfg.logging`` asks for (a :class:`scope_megatron.config.Config`), with the
        resolved config already logged to the sinks that keep one (TensorBoard text, W&B config)."""
        if not enabled:
            return cls(run_dir, enabled=False)
        out = cls(run_dir, enabled=True, use_tqdm=cfg.logging.tqdm, total_steps=cfg.steps, start_step=start_step,
                  sinks=sinks_from_config(cfg.logging, run_dir))
        out.log_config(dataclasses.asdict(cfg))
        return out

    def log(self, step: int, metrics: dict[str, Any], count_step: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self.sinks:
            sink.log(step, clean)
        rows = eval_summary_rows(clean)
        if rows:
            self.log_table("eval/summary", rows, step=step)
        if self.bar is not None and count_step:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{clean.get('loss/total', float('nan')):.4g}",
                                 acc=f"{clean.get('reward/accuracy', float('nan')):.2f}",
                                 t=f"{clean.get('time/step', 0.0):.1f}s")
        logger.info("%s", format_line(step, clean) if count_step else
                    f"step {step} | " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(clean.items())))

    def log_config(self, config: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_config(config)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int | None = None) -> None:
        for sink in self.sinks:
            sink.log_table(name, rows, step)

    def log_image(self, name: str, path: str | Path, step: int | None = None) -> None:
        for sink in self.sinks:
            sink.log_image(name, path, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def log_to_run(run_dir: str | Path, logging_cfg: Any, *, images: dict[str, str | Path] | None = None,
               tables: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Add images and tables to a finished training run's trackers (e.g. the demo's accuracy plot):
    TensorBoard under ``RUN_DIR/tensorboard`` and, with ``logging_cfg.wandb.enabled``, the same W&B
    run (its id is in ``RUN_DIR/wandb_run.json``). ``logging_cfg``: the run's
    :class:`scope_megatron.config.LoggingConfig`. Not written to ``metrics.jsonl``."""
    out = MetricsLogger(run_dir, enabled=True, use_tqdm=False, sinks=sinks_from_config(logging_cfg, run_dir, jsonl=False))
    try:
        for name, rows in (tables or {}).items():
            out.log_table(name, rows)
        for name, path in (images or {}).items():
            out.log_image(name, path)
    finally:
        out.close()


def _overlap_part(m: dict[str, float]) -> str:
    """Asynchronous rollouts: how much of the step the two sides overlapped and how long each
    waited (the trainer for rollouts, the engines for a batch to generate); "" in a serial step."""
    if "overlap/fraction" not in m:
        return ""
    trainer_idle = m.get("overlap/trainer_wait_s", 0.0) + m.get("time/rollout_wait", 0.0)
    return (f" | overlap {m['overlap/fraction']:.2f} (generating {m.get('overlap/generation_s', 0.0):.2f}s, "
            f"training {m.get('overlap/training_s', 0.0):.2f}s; idle: trainer {trainer_idle:.2f}s, "
            f"engines {m.get('overlap/engine_idle_s', 0.0):.2f}s)")


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
            + _overlap_part(m)
            + "".join(f" | {k} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("eval/mean/avg@")))
