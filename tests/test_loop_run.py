"""End-to-end SCOPE runs under torchrun with embedded engines (CPU, gloo), on two ranks:
TP=2 and PP=2 with padded micro-batches; DP=2 and CP=2 with packed micro-batches (a 64-token
budget: several micro-batches per rank, trajectories over the budget alone).

Each run trains 3 steps of the tiny config. Checked against independent references:
- losses are finite, every TensorBoard tag of docs/training.md is written, a checkpoint exists;
- after every weight sync, the student engine's log-probs of the probe equal plain transformers'
  log-probs computed from that step's HF export (so the engine holds exactly the trained weights),
  and so do the trainer's own (megatron) log-probs (under CP: a packed probe split over the ranks);
- the loss curve is the same in every layout, padded or packed (layout-independent objective).
"""

from __future__ import annotations

import math

import pytest

from scope_megatron.trainer.checkpointing import checkpoint_is_loadable, list_checkpoints
from tests.conftest import run_module
from tests.loop_utils import asset_overrides, documented_tags, hf_logprobs, read_metrics, run_train, \
    tensorboard_tags, tail

pytestmark = pytest.mark.timeout(300)
STEPS = 3
LOSS_CURVES: dict[str, dict[int, dict]] = {}  # layout -> metrics, to compare layouts


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from scope_megatron.examples.tiny import prepare

    root = tmp_path_factory.mktemp("tiny")
    paths = prepare(root)
    # the TP=2 run starts from a converted checkpoint, the PP=2 run straight from the HF directory
    ckpt = root / "student_ckpt"
    proc = run_module("checkpoints_tools.hf_to_megatron", "--hf", str(paths["student"]), "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths["student_ckpt"] = ckpt
    return paths


PACKED = ["parallel.max_tokens_per_microbatch=64"]
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2_packed": PACKED,
           "cp2_packed": ["parallel.cp=2", *PACKED]}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run(request, assets, tmp_path_factory):
    layout = request.param
    run_dir = tmp_path_factory.mktemp(f"run_{layout}")
    student = assets["student_ckpt"] if layout in ("tp2", "cp2_packed") else assets["student"]
    # responses up to 40 tokens: long enough to span both CP ranks' chunks of a packed trajectory
    proc = run_train(*asset_overrides(assets, run_dir, student), *LAYOUTS[layout], f"steps={STEPS}",
                     "rollout.max_new_tokens=40",
                     "checkpoint.every=1", "checkpoint.keep_last=2", "checkpoint.export_hf_steps=[1,2,3]",
                     nproc=2, timeout=280)
    assert proc.returncode == 0, tail(proc)
    return layout, run_dir


def test_losses_finite_and_every_tag_written(run):
    layout, run_dir = run
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for step, m in metrics.items():
        for key in ("loss/total", "loss/mle", "loss/kl", "train/grad_norm"):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (layout, step, key, m.get(key))
        assert m["train/skipped_nonfinite_total"] == 0
        # the toy reward routes rollouts to both paths
        assert m["objective/trajectories/mle_path"] + m["objective/trajectories/kl_path"] == m["rollout/trajectories"]
        assert m["rollout/stale_fraction"] == 0.0  # every rollout came from the previous step's weights
    tags = tensorboard_tags(run_dir)
    always, conditional = documented_tags()
    assert len(always) > 50
    missing = sorted(always - set(tags))
    assert not missing, f"documented tags not written: {missing}"
    undocumented = sorted(set(tags) - always - conditional)
    assert not undocumented, f"tags written but not documented in docs/training.md: {undocumented}"
    assert all(len(values) == STEPS for tag, values in tags.items() if tag in always)
    packed = layout.endswith("_packed")
    for m in metrics.values():
        assert m["train/micro_batches"] >= (2 if packed else 1)
        if layout == "dp2_packed":
            assert m["train/padding_fraction"] == 0.0  # packing without CP pads nothing
    # the objective is layout-independent: every layout gives the same curve (same seeds, same rollouts)
    for other, b in LOSS_CURVES.items():
        for step in range(1, STEPS + 1):
            assert metrics[step]["reward/accuracy"] == b[step]["reward/accuracy"], (layout, other, step)
            for key in ("loss/total", "loss/mle", "loss/kl", "train/grad_norm", "objective/ppl/student_mean"):
                assert metrics[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (layout, other, step, key)
    LOSS_CURVES[layout] = metrics


def test_checkpoints_present_and_pruned(run):
    _, run_dir = run
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 3]  # keep_last = 2
    assert all(checkpoint_is_loadable(p) for _, p in ckpts)
    assert (run_dir / "config.yaml").is_file()


def test_engine_matches_trained_weights_after_every_sync(run):
    import json

    layout, run_dir = run
    records = [json.loads(line) for line in (run_dir / "sync_probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    previous = None
    for rec in records:
        reference = hf_logprobs(run_dir / "hf" / f"step_{rec['step']:08d}", rec["prompt_ids"], rec["response_ids"])
        engine_diff = max(abs(a - b) for a, b in zip(rec["engine_logprobs"], reference))
        trainer_diff = max(abs(a - b) for a, b in zip(rec["trainer_logprobs"], reference))
        assert engine_diff < 1e-4, (layout, rec["step"], engine_diff)
        assert trainer_diff < 1e-4, (layout, rec["step"], trainer_diff)
        if previous is not None:  # the weights did change between syncs
            assert max(abs(a - b) for a, b in zip(reference, previous)) > 1e-4
        previous = reference


# a run's step-2 checkpoint resumed at another layout: padded TP2 -> packed CP2, packed DP2 -> padded PP2
RESUME_AT = {"tp2": "cp2_packed", "dp2_packed": "pp2"}


@pytest.mark.parametrize("run", list(RESUME_AT), indirect=True)
def test_resume_at_another_layout(run, assets, tmp_path):
    """Step 3 after resuming step 2's checkpoint under a different layout equals step 3 of the run:
    same metrics, and the same weights after the update (so the Adam moments were resharded, not reset)."""
    from tests.loop_utils import load_safetensors

    layout, run_dir = run
    other = RESUME_AT[layout]
    student = assets["student_ckpt"] if other in ("tp2", "cp2_packed") else assets["student"]
    proc = run_train(*asset_overrides(assets, tmp_path / "resumed", student), *LAYOUTS[other], f"steps={STEPS}",
                     "rollout.max_new_tokens=40", "checkpoint.every=0", "checkpoint.export_hf_steps=[3]",
                     f"checkpoint.resume={run_dir / 'checkpoints' / 'step_00000002'}", nproc=2, timeout=200)
    assert proc.returncode == 0, tail(proc)
    resumed, original = read_metrics(tmp_path / "resumed"), read_metrics(run_dir)
    assert sorted(resumed) == [3]
    for key in ("reward/accuracy", "loss/total", "loss/kl", "loss/mle", "train/grad_norm", "train/lr"):
        assert resumed[3][key] == pytest.approx(original[3][key], rel=1e-4, abs=1e-6), (layout, other, key)
    after = load_safetensors(tmp_path / "resumed" / "hf" / "step_00000003")
    expected = load_safetensors(run_dir / "hf" / "step_00000003")
    before = load_safetensors(run_dir / "hf" / "step_00000002")
    update = max((expected[n] - before[n]).abs().max().item() for n in expected)
    diff = max((after[n] - expected[n]).abs().max().item() for n in expected)
    print(f"{layout} -> {other}: step-3 update {update:.3g}, resumed vs original {diff:.3g}")
    assert update > 1e-4  # lr 1e-3: the step moved the weights
    assert diff < 1e-2 * update, (layout, other, diff, update)
