"""checkpoint.keep_best: the best checkpoint by an eval metric survives keep_last pruning.

Hand-made metrics per step (expected survivors worked out by hand below) drive real saves of a
tiny model on one gloo rank; the best is named by ``RUN_DIR/checkpoints/best`` and its value is in
the checkpoint's ``scope_megatron.json``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.dist_utils import run_ranks

pytestmark = pytest.mark.timeout(300)

METRIC = "eval/mean/avg@1"


def test_select_best_rules():
    from scope_megatron.trainer.checkpointing import select_best

    assert select_best([], "max") is None
    assert select_best([(2, 0.5), (4, 0.7), (6, 0.3)], "max") == 4
    assert select_best([(2, 0.5), (4, 0.7), (6, 0.3)], "min") == 6
    assert select_best([(4, 0.7), (2, 0.7)], "max") == 2  # a tie keeps the earlier step
    assert select_best([(2, math.nan), (3, 0.1)], "max") == 3  # NaN is never best
    assert select_best([(2, math.inf), (3, 0.1)], "max") == 3


def _worker(rank: int, world: int, hf_dir: str, root: str, mode: str, plan: list) -> dict:
    from pathlib import Path

    from scope_megatron.megatron_step import wrap_for_training
    from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.model.hf_io import HFWeightReader, load_hf_into_model
    from scope_megatron.parallel import init_parallel
    from scope_megatron.trainer import checkpointing as ck

    init_parallel(1, 1)
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    model = build_gpt_model(arch, perform_initialization=False)
    load_hf_into_model(model, arch, HFWeightReader(hf_dir, arch))
    _, opt, sched = wrap_for_training(model, lr=1e-2, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-6)
    manager = ck.CheckpointManager(root, keep_last=2, keep_best=METRIC, keep_best_mode=mode)
    common = dict(model=model, optimizer=opt, scheduler=sched, arch=arch, hf_side_dir=hf_dir, dtype=torch.float32,
                  trainer_state={}, config_yaml="steps: 8\n")
    after = []
    for step, metrics in plan:
        manager.save(step, metrics=metrics, **common)
        best = ck.find_best(root)
        after.append({"steps": [s for s, _ in ck.list_checkpoints(root)],
                      "best": int(best.name.split("_")[1]) if best else None})
    best = ck.find_best(root)
    meta = json.loads((best / "scope_megatron.json").read_text()) if best else {}
    # a fresh manager (a restarted run) finds the same best from the checkpoints on disk
    restarted = ck.CheckpointManager(root, keep_last=2, keep_best=METRIC, keep_best_mode=mode).best_step()
    return {"after": after, "meta": meta, "restarted": restarted,
            "resume_best": str(ck.resolve_resume("best", root)), "best_path": str(best)}


# (step, the step's scalars); a step without METRIC is a training step without evaluation
PLAN = [
    (1, {"loss/total": 1.0}),                          # no eval: not a candidate
    (2, {"loss/total": 0.9, METRIC: 0.5}),
    (3, {"loss/total": 0.8}),
    (4, {"loss/total": 0.7, METRIC: 0.7}),
    (5, {"loss/total": 0.6, METRIC: 0.7}),             # ties step 4: step 4 stays best
    (6, {"loss/total": 0.5, METRIC: 0.3}),
    (7, {"loss/total": 0.4, METRIC: float("nan")}),    # NaN: not a candidate
    (8, {"loss/total": 0.3, METRIC: 0.9}),
    (8, {"loss/total": 0.3}),                          # the end-of-run re-save of step 8: keeps its value
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    return save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "hf", "qwen3", seed=7)


def test_best_checkpoint_survives_keep_last(hf_dir, tmp_path):
    root = tmp_path / "ckpts"
    out = run_ranks(_worker, world_size=1, args=(str(hf_dir), str(root), "max", PLAN), timeout=280)[0]
    # keep_last=2 plus the best (max): worked out step by step
    assert out["after"] == [
        {"steps": [1], "best": None},
        {"steps": [1, 2], "best": 2},
        {"steps": [2, 3], "best": 2},        # 1 pruned (no metric, not in the last 2)
        {"steps": [3, 4], "best": 4},        # 2 no longer best: pruned
        {"steps": [4, 5], "best": 4},        # tie: the earlier step stays best
        {"steps": [4, 5, 6], "best": 4},     # best kept beyond the last 2
        {"steps": [4, 6, 7], "best": 4},     # NaN at 7: not a candidate
        {"steps": [7, 8], "best": 8},
        {"steps": [7, 8], "best": 8},
    ]
    assert out["meta"]["training_step"] == 8
    assert out["meta"]["tracked_metric"] == {"name": METRIC, "value": 0.9, "mode": "max"}
    assert out["restarted"] == 8
    assert out["resume_best"] == out["best_path"]


def test_min_mode(hf_dir, tmp_path):
    root = tmp_path / "ckpts"
    plan = [(1, {METRIC: 0.4}), (2, {METRIC: 0.2}), (3, {}), (4, {METRIC: 0.9}), (5, {METRIC: 0.2})]
    out = run_ranks(_worker, world_size=1, args=(str(hf_dir), str(root), "min", plan), timeout=280)[0]
    assert [a["best"] for a in out["after"]] == [1, 2, 2, 2, 2]
    assert out["after"][-1]["steps"] == [2, 4, 5]
    assert out["meta"]["tracked_metric"]["value"] == 0.2 and out["meta"]["training_step"] == 2


def test_keep_best_config_is_checked():
    from scope_megatron.config import ConfigError, load_config
    from tests.loop_utils import TINY_CONFIG

    with pytest.raises(ConfigError, match=r"checkpoint\.keep_best_mode"):
        load_config(TINY_CONFIG, ["checkpoint.keep_best_mode=best"])
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_best"):
        load_config(TINY_CONFIG, [f"checkpoint.keep_best={METRIC}", "eval.every=0"])
