"""Checkpoints: a crash while writing one leaves the previous one loadable; optimizer state round-trips.

Runs on 2 gloo ranks (TP=2, distributed optimizer): a real optimizer step, checkpoint 1, a second
step, then checkpoint 2 fails after the model part was written (as a crash would). Checkpoint 1
must still be the latest, load, and give back step-1 weights, optimizer moments and scheduler; a
step from the restored state must equal the step taken from the live state after checkpoint 1.
A leftover ``.partial`` directory (what SIGKILL leaves) is ignored and cleaned by the next save.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks

pytestmark = pytest.mark.timeout(240)


def _batch(vocab: int, seed: int):
    from scope_megatron.batch import MicroBatch, TokenFields

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, 9), generator=gen)
    mask = torch.ones(2, 8)
    mask[:, :3] = 0
    return [MicroBatch(tokens[:, :-1], TokenFields(targets=tokens[:, 1:], response_mask=mask), int(mask.sum()))]


def _nll(logits, mb, vocab, total):
    from scope_megatron.objective import vocab_parallel_logprobs

    lp = vocab_parallel_logprobs(logits, mb.fields.targets, vocab_size=vocab)
    return -(lp * mb.fields.response_mask).sum() / total, {}


def _weights(model, arch):
    from scope_megatron.model.hf_io import export_hf_tensors

    return {n: t.clone() for n, t in export_hf_tensors(model, arch)}


def _worker(rank: int, world: int, hf_dir: str, root: str) -> dict:
    from functools import partial
    from pathlib import Path

    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.model.hf_io import HFWeightReader, load_hf_into_model
    from scope_megatron.parallel import init_parallel
    from scope_megatron.trainer import checkpointing as ck

    init_parallel(2, 1)
    arch = arch_from_hf_config(load_hf_config(hf_dir))

    def fresh():
        model = build_gpt_model(arch, perform_initialization=False)
        load_hf_into_model(model, arch, HFWeightReader(hf_dir, arch))
        ddp, opt, sched = wrap_for_training(model, lr=1e-2, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-6)
        return model, ddp, opt, sched

    vocab = arch.vocab_size
    loss = partial(_nll, vocab=vocab, total=10)
    model, ddp, opt, sched = fresh()
    train_step(ddp, opt, sched, _batch(vocab, 1), loss)
    common = dict(arch=arch, hf_side_dir=hf_dir, dtype=torch.float32, config_yaml="steps: 1\n")
    ck.save_checkpoint(root, 1, model=model, optimizer=opt, scheduler=sched, trainer_state={"sampler": {"x": 1}},
                       **common)
    w1 = _weights(model, arch)
    live_after = train_step(ddp, opt, sched, _batch(vocab, 2), loss)
    w2_live = _weights(model, arch)

    # checkpoint 2 crashes after the model part was written
    original = ck.save_optimizer

    def crashing(*args, **kwargs):
        raise OSError("disk full (simulated crash while writing the optimizer)")

    ck.save_optimizer = crashing
    try:
        with pytest.raises(OSError, match="simulated crash"):
            ck.save_checkpoint(root, 2, model=model, optimizer=opt, scheduler=sched, trainer_state={}, **common)
    finally:
        ck.save_optimizer = original
    names = sorted(p.name for p in Path(root).iterdir())
    latest = ck.find_latest(root)

    # what SIGKILL leaves behind: a partial directory, never loaded
    if rank == 0:
        junk = Path(root) / "step_00000003.partial"
        junk.mkdir()
        (junk / "trainer_state.pt").write_text("garbage")
    torch.distributed.barrier()
    latest_with_junk = ck.find_latest(root)

    # restore checkpoint 1 into a fresh model/optimizer and repeat the second step
    model_b, ddp_b, opt_b, sched_b = fresh()
    state = ck.load_checkpoint(latest, model=model_b, optimizer=opt_b, scheduler=sched_b)
    restored = _weights(model_b, arch)
    resumed_after = train_step(ddp_b, opt_b, sched_b, _batch(vocab, 2), loss)
    w2_resumed = _weights(model_b, arch)
    ck.save_checkpoint(root, 3, model=model_b, optimizer=opt_b, scheduler=sched_b, trainer_state={}, **common)
    final_names = sorted(p.name for p in Path(root).iterdir())
    return {"names": names, "latest": str(latest), "latest_with_junk": str(latest_with_junk), "state": state,
            "w1": w1, "restored": restored, "w2_live": w2_live, "w2_resumed": w2_resumed,
            "loss_live": live_after.loss, "loss_resumed": resumed_after.loss,
            "gnorm_live": live_after.grad_norm, "gnorm_resumed": resumed_after.grad_norm,
            "final_names": final_names}


def test_crash_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    hf_dir = save_tiny_hf_model(tmp_path / "hf", "qwen3", seed=3)
    root = tmp_path / "ckpts"
    out = run_ranks(_worker, world_size=2, args=(str(hf_dir), str(root)), timeout=220)[0]
    assert out["names"] == ["step_00000001"]  # no step_2, no leftover .partial
    assert out["latest"].endswith("step_00000001")
    assert out["latest_with_junk"].endswith("step_00000001")
    assert out["state"]["step"] == 1 and out["state"]["sampler"] == {"x": 1}
    for name, value in out["w1"].items():
        assert torch.equal(out["restored"][name], value), name
    # the optimizer (Adam moments, step count) and scheduler came back exactly: same next step
    assert out["loss_resumed"] == out["loss_live"]
    assert out["gnorm_resumed"] == out["gnorm_live"]
    for name, value in out["w2_live"].items():
        assert torch.equal(out["w2_resumed"][name], value), name
    assert out["final_names"] == ["step_00000001", "step_00000003"]  # the next save cleaned the partial
