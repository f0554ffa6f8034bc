"""The training config: YAML + overrides, errors that name the field, the shipped configs validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from scope_megatron.config import ConfigError, config_from_dict, load_config
from tests.loop_utils import REPO, TINY_CONFIG, loop_env


def test_tiny_config_and_overrides():
    cfg = load_config(TINY_CONFIG, ["rollout.group_size=5", "optimizer.lr=2e-4", "data.paths=[a.jsonl,b.jsonl]",
                                    "checkpoint.resume=latest", "sync.verify=false", "parallel.tp=2"])
    assert cfg.rollout.group_size == 5 and cfg.optimizer.lr == 2e-4
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"] and cfg.checkpoint.resume == "latest"
    assert cfg.sync.verify is False and cfg.parallel.tp == 2
    assert cfg.embedded_student and cfg.embedded_teacher
    # the saved YAML round-trips to the same config
    import yaml

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("override, field", [
    ("rollout.grup_size=4", "rollout.grup_size"),
    ("rollout.group_size=0", "rollout.group_size"),
    ("rollout.group_size=two", "rollout.group_size"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("sync.transport=carrier_pigeon", "sync.transport"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("algorithm.tau=0", "algorithm"),
    ("algorithm.preset=nope", "algorithm"),
    ("algorithm.updates_per_batch=2", "algorithm.clip_eps"),
    ("checkpoint.export_hf_steps=[0]", "checkpoint.export_hf_steps[0]"),
    ("model.student=", "model.student"),
    ("bogus=1", "bogus"),
    ("parallel.cp=0", "parallel.cp"),
    ("parallel.cp=2", "parallel.max_tokens_per_microbatch"),  # CP splits packed rows: it needs a budget
    ("parallel.max_tokens_per_microbatch=0", "parallel.max_tokens_per_microbatch"),
    ("parallel.oversize_sequences=split", "parallel.oversize_sequences"),
    ("algorithm.topk_kl=sideways", "algorithm"),
    ("rollout.max_staleness=-1", "rollout.max_staleness"),
    ("algorithm.off_policy_correction=is", "algorithm"),
    ("algorithm.tis_cap=0", "algorithm"),
    ("placement=shared", "placement"),
    ("sync.transport=tensor", "sync.transport"),  # handles reach only colocated engines
    ("algorithm.refill_filtered_groups=true", "algorithm.refill_filtered_groups"),  # refills what the filter drops
    ("algorithm.refill_max_rounds=0", "algorithm.refill_max_rounds"),
    ("teacher.routes={b: nobody}", "teacher.routes.b"),  # a route must name a teacher
    ("teacher.others={second: {model: /m}}", "teacher.others.second"),  # a teacher no route names
    ("teacher.others={default: {model: /m}}", "teacher.others.default"),  # the section's own teacher
    ("teacher.others={'a b': {model: /m}}", "teacher.others.a b"),
    ("teacher.routes=[b, second]", "teacher.routes"),
    ("teacher.others={second: {modle: /m}}", "teacher.others.second.modle"),
])
def test_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, [override])
    assert info.value.field == field, str(info.value)
    assert repr(field) in str(info.value)


def test_context_parallel_checks():
    from scope_megatron.config import check_world

    cp = ["parallel.cp=2", "parallel.max_tokens_per_microbatch=64"]
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, [*cp, "model.layer_impl=local"])
    assert info.value.field == "model.layer_impl"
    cfg = load_config(TINY_CONFIG, [*cp, "parallel.tp=2"])
    check_world(cfg, 8)  # DP 2
    with pytest.raises(ConfigError, match=r"tp\*pp\*cp = 2\*1\*2"):
        check_world(cfg, 6)


def test_topk_kl_config():
    cfg = load_config(TINY_CONFIG, ["algorithm.topk_kl=reverse", "algorithm.topk_k=4", "algorithm.sampled_kl_coef=0"])
    objective = cfg.objective_config()
    assert (objective.topk_kl, objective.sampled_kl_coef, objective.topk_kl_coef) == ("reverse", 0.0, 1.0)
    for overrides, field in ((["algorithm.topk_kl=forward", "algorithm.topk_k=0"], "algorithm.topk_k"),
                             (["algorithm.topk_kl=forward", "algorithm.preset=grpo"], "algorithm.topk_kl")):
        with pytest.raises(ConfigError) as info:
            load_config(TINY_CONFIG, overrides)
        assert info.value.field == field, str(info.value)


def test_old_logprobs_from_the_engine_only_for_one_on_policy_update():
    assert load_config(TINY_CONFIG, ["algorithm.old_logprobs=rollout"]).algorithm.old_logprobs == "rollout"
    rollout = "algorithm.old_logprobs=rollout"
    for overrides, field in (
            (["algorithm.old_logprobs=cached"], "algorithm.old_logprobs"),
            ([rollout, "algorithm.updates_per_batch=2", "algorithm.clip_eps=0.2"], "algorithm.updates_per_batch"),
            ([rollout, "rollout.max_staleness=1"], "rollout.max_staleness"),
            ([rollout, "algorithm.off_policy_correction=tis"], "algorithm.off_policy_correction"),
            ([rollout, "algorithm.scale_logits_by_rollout_temperature=false"],
             "algorithm.scale_logits_by_rollout_temperature"),
            ([rollout, "algorithm.preset=sft"], "algorithm.preset")):
        with pytest.raises(ConfigError) as info:
            load_config(TINY_CONFIG, overrides)
        assert info.value.field == field, str(info.value)


@pytest.mark.parametrize("overrides, field", [
    (["placement=colocated", "rollout.max_staleness=1"], "placement"),  # they take turns: nothing to overlap
    (["placement=colocated", "sync.transport=disk"], "sync.transport"),
    (["placement=colocated", "algorithm.preset=sft"], "placement"),
    (["rollout.max_staleness=1", "algorithm.preset=kd"], "rollout.max_staleness"),
    (["algorithm.off_policy_correction=tis", "algorithm.preset=sft"], "algorithm"),
])
def test_asynchronous_and_colocated_combinations(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_CONFIG, overrides)
    assert info.value.field == field, str(info.value)
    cfg = load_config(TINY_CONFIG, ["rollout.max_staleness=1", "algorithm.off_policy_correction=tis"])
    assert cfg.objective_config().off_policy_correction == "tis" and cfg.objective_config().tis_cap == 2.0
    assert load_config(TINY_CONFIG, ["placement=colocated"]).placement == "colocated"


def test_a_config_states_what_differs_from_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text(TINY_CONFIG.read_text())
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nsteps: 7\nrollout:\n  group_size: 3\n")
    cfg = load_config(tmp_path / "variant.yaml")
    base = load_config(TINY_CONFIG)
    assert (cfg.steps, cfg.rollout.group_size) == (7, 3)
    assert cfg.rollout.max_new_tokens == base.rollout.max_new_tokens and cfg.model == base.model  # merged per section
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["r1_distill_qwen_1p5b_from_skywork_or1_7b.yaml", "qwen3_1p7b_base_from_qwen3_8b.yaml",
                                  "r1_distill_qwen_1p5b_from_skywork_or1_7b_colocated.yaml",
                                  "qwen3_1p7b_base_from_qwen3_8b_colocated.yaml"])
def test_paper_configs_have_the_paper_hyperparameters(name):
    cfg = load_config(REPO / "configs" / name)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (256, 8)
    assert cfg.rollout.temperature == 0.6 and cfg.rollout.max_new_tokens == 12288
    assert cfg.data.max_prompt_tokens == 4096
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (5e-5, 0.01, 1.0)
    assert cfg.optimizer.lr_decay_style == "constant" and cfg.optimizer.lr_warmup_steps == 0
    assert cfg.algorithm.updates_per_batch == 1
    objective = cfg.objective_config()
    assert objective.method == "scope" and objective.tau == 1.0 and objective.normalize == "mean1"
    assert cfg.algorithm.scale_logits_by_rollout_temperature
    assert cfg.model.dtype in ("auto", "bfloat16")
    # packed micro-batches: one budget holds the longest trajectory (prompt 4,096 + response 12,288)
    assert cfg.parallel.max_tokens_per_microbatch >= 4096 + 12288


def test_entry_point_reports_config_errors_and_prints_config(tmp_path):
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "scope_megatron.train", "--config", str(TINY_CONFIG),
                          "rollout.group_size=0"], cwd=REPO, env=loop_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "rollout.group_size" in bad.stderr
    good = subprocess.run([sys.executable, "-m", "scope_megatron.train", "--config", str(TINY_CONFIG), "--print-config",
                           "steps=7"], cwd=REPO, env=loop_env(), capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and "steps: 7" in good.stdout
    assert Path(REPO / "docs" / "training.md").is_file()


def test_a_trajectory_over_the_budget_with_oversize_error_aborts_the_run(tmp_path):
    """parallel.oversize_sequences=error: the step stops with a message naming the budget, exit 1."""
    from scope_megatron.examples.tiny import prepare
    from tests.loop_utils import asset_overrides, run_train

    assets = prepare(tmp_path / "tiny")
    proc = run_train(*asset_overrides(assets, tmp_path / "run"), "steps=1", "parallel.max_tokens_per_microbatch=16",
                     "parallel.oversize_sequences=error", timeout=180)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "ABORTED: step 1:" in proc.stderr and "exceed max_tokens_per_microbatch = 16" in proc.stderr
