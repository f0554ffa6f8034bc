"""Metrics sinks: metrics.jsonl, TensorBoard and a W&B offline run hold the same scalars.

The W&B run is read back from its offline ``run-<id>.wandb`` file, independently of the code under
test: wandb 0.31 ships no Python reader (its Go core reads the file), so :func:`_wandb_records`
decodes the LevelDB-log framing W&B documents in its former ``wandb/sdk/internal/datastore.py``
(7-byte file header ``:W&B`` / 0xBEE1 / version; 32 KiB blocks of records
``crc32 (uint32) | length (uint16) | type (FULL=1, FIRST=2, MIDDLE=3, LAST=4) | data``) into
wandb's own protobuf ``wandb.proto.wandb_internal_pb2.Record``. TensorBoard is read with
tensorboard's own ``EventAccumulator``.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
import zlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

_BLOCK = 32768
_HEADER = 7


def _wandb_records(path: Path) -> list:
    """Every protobuf Record of a ``.wandb`` file, in order (checksums verified)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, payload, records = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: zero padding
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:  # zero-filled rest of the last block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes((kind,)))) & 0xFFFFFFFF == checksum, f"bad checksum at {pos}"
        pos += _HEADER + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def _finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records once the run's exit record is on disk: wandb-core writes the file from its own
    process and may still be flushing when ``run.finish()`` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _history(records) -> dict[int, dict]:
    """W&B history rows by step: {key: decoded JSON value (a dict for tables / images)}."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)  # nested: a media value's fields
            node = row
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
        rows[int(record.history.step.num)] = row
    return rows


def _wandb_file(root: Path) -> list[Path]:
    return sorted(root.rglob("run-*.wandb"))


TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"


def _config(tmp_path: Path):
    from scope_megatron.config import load_config

    return load_config(TINY_CONFIG, [f"run_dir={tmp_path / 'run'}", "steps=3", "logging.tqdm=false",
                                     "logging.wandb.enabled=true", "logging.wandb.project=scope-test",
                                     "logging.wandb.name=sinks", "logging.wandb.tags=[ci]",
                                     "logging.wandb.mode=online"])


def _no_api_key(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampler in the test


def test_wandb_offline_run_holds_the_jsonl_scalars(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb")
    from scope_megatron.trainer.metrics import MetricsLogger, log_to_run

    _no_api_key(monkeypatch, tmp_path)
    cfg = _config(tmp_path)
    run_dir = Path(cfg.run_dir)
    steps = {
        0: {"eval/mean/avg@1": 0.25, "eval/gsm/avg@1": 0.5, "eval/gsm/pass@4": 0.75},
        1: {"loss/total": 1.5, "reward/accuracy": 0.125, "train/lr": 1e-5, "time/step": 0.3, "rollout/trajectories": 8},
        2: {"loss/total": 1.25, "reward/accuracy": 0.375, "train/lr": 2e-5, "time/step": 0.2, "rollout/trajectories": 8,
            "eval/mean/avg@1": 0.5, "eval/gsm/avg@1": 0.625, "eval/gsm/pass@4": 0.875, "flag": True, "note": "x"},
        3: {"loss/total": float("nan"), "reward/accuracy": 0.5, "train/lr": 3e-5},
    }
    with caplog.at_level(logging.WARNING, logger="scope_megatron.trainer.sinks"):
        metrics = MetricsLogger.from_config(cfg, run_dir, enabled=True, start_step=0)
    assert any("no W&B API key" in r.getMessage() for r in caplog.records)  # online fell back to offline
    for step, scalars in steps.items():
        metrics.log(step, dict(scalars), count_step=step > 0)
    metrics.close()

    jsonl = {row.pop("step"): row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(jsonl) == [0, 1, 2, 3]
    assert "flag" not in jsonl[2] and "note" not in jsonl[2]  # only numbers are scalars
    assert jsonl[3]["loss/total"] == "nan"

    files = _wandb_file(tmp_path)
    assert len(files) == 1, files
    records = _finished_records(files[0])
    history = _history(records)
    assert sorted(history) == sorted(jsonl)
    for step, row in jsonl.items():
        scalars = {k: v for k, v in history[step].items() if not k.startswith("_") and k != "eval/summary"}
        assert sorted(scalars) == sorted(row), step
        for key, value in row.items():
            if value == "nan":
                assert isinstance(scalars[key], (float, str)) and math.isnan(float(scalars[key])), (step, key)
            else:
                assert scalars[key] == value, (step, key, scalars[key], value)
    # eval steps carry the eval summary table; others do not
    assert [s for s in sorted(history) if "eval/summary" in history[s]] == [0, 2]
    assert history[2]["eval/summary"]["_type"] == "table-file"
    rows = [json.loads(line) for line in (run_dir / "tables" / "eval_summary.jsonl").read_text().splitlines()]
    assert {"step": 2, "benchmark": "gsm", "metric": "pass@4", "value": 0.875} in rows
    # the resolved config
    config_items = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
                    for item in r.config.update}
    assert config_items["steps"] == 3
    assert config_items["logging"]["wandb"]["project"] == "scope-test"
    assert config_items["checkpoint"]["keep_best_mode"] == cfg.checkpoint.keep_best_mode
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "scope-test" and run.display_name == "sinks" and list(run.tags) == ["ci"]

    # TensorBoard holds the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for step, row in jsonl.items():
        for key, value in row.items():
            events = {e.step: e.value for e in acc.Scalars(key)}
            if value == "nan":
                assert math.isnan(events[step])
            else:
                assert events[step] == pytest.approx(value, rel=1e-6), (step, key)  # TB stores float32

    # the demo's hook: an image added to the same W&B run after training
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2), dpi=40)
    ax.plot([0, 1], [0, 1])
    png = tmp_path / "accuracy.png"
    fig.savefig(png)
    plt.close(fig)
    log_to_run(run_dir, cfg.logging, images={"demo/accuracy": png})
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    later = [f for f in _wandb_file(tmp_path) if f != files[0]]
    assert len(later) == 1 and later[0].name == f"run-{run_id}.wandb"
    image_rows = [row for row in _history(_finished_records(later[0])).values() if "demo/accuracy" in row]
    assert image_rows and image_rows[0]["demo/accuracy"]["_type"] == "image-file"
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "demo/accuracy" in acc.Tags()["images"]


def test_api_key_detection(tmp_path, monkeypatch, caplog):
    from scope_megatron.trainer.sinks import resolve_wandb_mode, wandb_api_key_available

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not wandb_api_key_available()  # no netrc file
    netrc_file.write_text("machine example.com login user password other\n")
    netrc_file.chmod(0o600)
    assert not wandb_api_key_available()  # an entry for another host
    with caplog.at_level(logging.WARNING, logger="scope_megatron.trainer.sinks"):
        assert resolve_wandb_mode("online") == "offline"
    assert any("no W&B API key" in r.getMessage() for r in caplog.records)
    assert resolve_wandb_mode("disabled") == "disabled"
    netrc_file.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert wandb_api_key_available() and resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.internal.example:8443")
    assert not wandb_api_key_available()  # the key is for another W&B server
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_api_key_available()


@pytest.mark.parametrize("override, field", [("logging.wandb.mode=sometimes", "logging.wandb.mode"),
                                             ("logging.wandb.tagz=[a]", "logging.wandb.tagz")])
def test_config_fields_are_validated(override, field):
    from scope_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TINY_CONFIG, [override])
