"""Metrics sinks: where a step's scalars, the resolved config, tables and images go.

Every sink receives the same dict of scalars per step (:class:`MetricsSink`); the
:class:`~scope_megatron.trainer.metrics.MetricsLogger` fans out to them. Sinks here:

- :class:`JsonlSink`: ``RUN_DIR/metrics.jsonl``, one JSON line per :meth:`log` (what tests and
  scripts read); tables to ``RUN_DIR/tables/<name>.jsonl``.
- :class:`TensorBoardSink`: ``RUN_DIR/tensorboard`` (scalars; config and tables as text; images).
- :class:`WandbSink`: a Weights & Biases run (``logging.wandb``; ``pip install .[wandb]``).

Another tracker (MLflow, ...) is one more class with these five methods, added in
:func:`sinks_from_config`.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

WANDB_RUN_FILE = "wandb_run.json"  # RUN_DIR/wandb_run.json: the W&B run this run directory logs to


@runtime_checkable
class MetricsSink(Protocol):
    """One destination of the trainer's metrics (rank 0 only)."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """The step's scalars, by tag (``loss/total``, ``eval/mean/avg@1``, ...)."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The run's resolved config (nested dicts, as ``dataclasses.asdict(Config)``)."""

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int | None = None) -> None:
        """A table: one dict per row, the same keys in every row (the columns)."""

    def log_image(self, name: str, path: str | Path, step: int | None = None) -> None:
        """An image file (PNG) under ``name``."""

    def close(self) -> None:
        """Flush and release the destination."""


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan", "inf" as strings
    return value


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)


class JsonlSink:
    """``RUN_DIR/metrics.jsonl``: ``{"step": N, tag: value, ...}`` per :meth:`log`, appended."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (self.run_dir / "metrics.jsonl").open("a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **{k: _json_value(v) for k, v in scalars.items()}}) + "\n")
        self.file.flush()

    def log_config(self, config: dict[str, Any]) -> None:
        """No-op: the trainer writes the resolved config to ``RUN_DIR/config.yaml`` itself."""

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int | None = None) -> None:
        out = self.run_dir / "tables" / f"{_safe_name(name)}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **{k: _json_value(v) for k, v in row.items()}}) + "\n")

    def log_image(self, name: str, path: str | Path, step: int | None = None) -> None:
        """No-op: the image is already a file of the run."""

    def close(self) -> None:
        self.file.close()


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(empty)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardSink:
    """``RUN_DIR/tensorboard``: every scalar under its tag; config and tables as text, images."""

    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")
        self.writer.flush()

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int | None = None) -> None:
        self.writer.add_text(name, _markdown_table(rows), global_step=step)
        self.writer.flush()

    def log_image(self, name: str, path: str | Path, step: int | None = None) -> None:
        import matplotlib.image

        pixels = matplotlib.image.imread(str(path))  # H x W x C floats in [0, 1] for a PNG
        if pixels.ndim == 3 and pixels.shape[2] == 4:
            pixels = pixels[:, :, :3]
        self.writer.add_image(name, pixels, global_step=step, dataformats="HWC" if pixels.ndim == 3 else "HW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_api_key_available() -> bool:
    """Whether W&B can authenticate: ``WANDB_API_KEY``, or a netrc entry for the W&B host
    (``WANDB_BASE_URL``, default api.wandb.ai), which is where ``wandb login`` stores the key."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(mode: str) -> str:
    """``online`` without an API key becomes ``offline`` (with a warning): a run never fails for
    want of a W&B login; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later."""
    if mode == "online" and not wandb_api_key_available():
        logger.warning("logging.wandb.mode=online but no W&B API key (WANDB_API_KEY or a netrc entry from "
                       "`wandb login`): logging offline; upload later with `wandb sync`")
        return "offline"
    return mode


class WandbSink:
    """A Weights & Biases run: the same scalars as TensorBoard at the same steps, the resolved
    config, tables (``wandb.Table``) and images (``wandb.Image``). Files go under ``RUN_DIR/wandb``;
    the run's id is kept in ``RUN_DIR/wandb_run.json`` so a resumed training (or the demo, with
    :func:`scope_megatron.trainer.metrics.log_to_run`) continues the same W&B run."""

    def __init__(self, run_dir: str | Path, *, project: str, entity: str | None = None, name: str | None = None,
                 tags: list[str] | tuple[str, ...] = (), mode: str = "online"):
        import wandb

        self.run_dir = Path(run_dir)
        self.mode = resolve_wandb_mode(mode)
        record_path = self.run_dir / WANDB_RUN_FILE
        previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
        run_id = previous.get("id") if previous.get("project") == project else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(project=project, entity=entity, name=name, tags=list(tags) or None, dir=str(self.run_dir),
                      id=run_id, resume="allow" if run_id else None,
                      # console capture would duplicate the trainer's own log file (RUN_DIR/*.log)
                      settings=wandb.Settings(console="off"))
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as exc:  # an unreachable server in online mode: keep training, log locally
            if self.mode != "online":
                raise
            logger.warning("W&B online init failed (%s): logging offline", exc)
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, **kwargs)
        if self.mode != "disabled":
            record_path.write_text(json.dumps({"id": self.run.id, "project": project, "entity": entity,
                                               "mode": self.mode}))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int | None = None) -> None:
        import wandb

        columns = list(rows[0]) if rows else []
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({name: table}, **({"step": step} if step is not None else {}))

    def log_image(self, name: str, path: str | Path, step: int | None = None) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path))}, **({"step": step} if step is not None else {}))

    def close(self) -> None:
        self.run.finish()


def sinks_from_config(logging_cfg: Any, run_dir: str | Path, jsonl: bool = True) -> list[MetricsSink]:
    """The sinks ``logging_cfg`` (a :class:`scope_megatron.config.LoggingConfig`) asks for."""
    sinks: list[MetricsSink] = [JsonlSink(run_dir)] if jsonl else []
    if logging_cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    w = logging_cfg.wandb
    if w.enabled and w.mode != "disabled":
        sinks.append(WandbSink(run_dir, project=w.project, entity=w.entity, name=w.name, tags=w.tags, mode=w.mode))
    return sinks
