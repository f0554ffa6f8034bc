"""The model knobs: fusions resolve to what this machine can run, recompute and sequence parallelism
are real choices that change nothing but memory and speed.

* Fusions: ``auto`` on CPU is all off; ``true`` without the kernel is a ``ConfigError`` naming the
  field; with the kernels reported present ``auto`` turns each on; the model builds.
* Recompute: one training step with selective and with full (uniform and block) recompute gives the
  gradients of the step without recompute (fp32 on CPU: the recomputed forward replays the same
  ops, so the gradients agree to rounding), at TP1 and TP2 + sequence parallelism.
* Sequence parallelism (TP2, local layers on gloo): loss and per-parameter gradients equal TP2
  without it; the norms' weights carry megatron's ``sequence_parallel`` mark; padded and packed
  micro-batches are padded to a multiple of TP by the batching code.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks

SEQ_LENS = [12, 7, 16, 5]  # padded to a multiple of TP (2) by pad_sequences(length_multiple=2)
RECOMPUTE_VARIANTS = [("none", "uniform", 1), ("selective", "uniform", 1), ("full", "uniform", 1),
                      ("full", "block", 1), ("full", "uniform", 2)]


# ------------------------------------------------------------------------------------------------ fusions
def test_auto_fusions_are_off_on_cpu_and_true_is_refused():
    from scope_megatron.config import ConfigError
    from scope_megatron.model.builder import FUSIONS, ModelOptions, fusion_unavailable_reasons, resolve_fusions

    assert all(reason == "needs CUDA" for reason in fusion_unavailable_reasons(cuda=False).values())
    assert resolve_fusions(ModelOptions(), cuda=False) == {name: False for name in FUSIONS}
    for name in FUSIONS:
        with pytest.raises(ConfigError) as err:
            resolve_fusions(ModelOptions(**{name: True}), cuda=False)
        assert err.value.field == f"model.{name}" and "needs CUDA" in str(err.value)
        assert resolve_fusions(ModelOptions(**{name: False}), cuda=False)[name] is False


def test_auto_fusions_follow_the_kernels_present():
    from scope_megatron.config import ConfigError
    from scope_megatron.model.builder import ModelOptions, resolve_fusions

    # a GPU with TE but no apex: the output layer cannot fuse gradient accumulation
    gpu_no_apex = {"apply_rope_fusion": None, "bias_activation_fusion": None, "bias_dropout_fusion": None,
                   "gradient_accumulation_fusion": "needs apex"}
    assert resolve_fusions(ModelOptions(), unavailable=gpu_no_apex) == {
        "apply_rope_fusion": True, "bias_activation_fusion": True, "bias_dropout_fusion": True,
        "gradient_accumulation_fusion": False}
    assert resolve_fusions(ModelOptions(bias_dropout_fusion=False), unavailable=gpu_no_apex)["bias_dropout_fusion"] is False
    with pytest.raises(ConfigError, match="apex") as err:
        resolve_fusions(ModelOptions(gradient_accumulation_fusion=True), unavailable=gpu_no_apex)
    assert err.value.field == "model.gradient_accumulation_fusion"
    with pytest.raises(ConfigError) as err:
        resolve_fusions(ModelOptions(apply_rope_fusion="yes"), unavailable=gpu_no_apex)
    assert err.value.field == "model.apply_rope_fusion"


def test_config_fields_validate_and_reach_the_options(tmp_path):
    from scope_megatron.config import ConfigError, load_config
    from scope_megatron.model.builder import ModelOptions

    base = ["model.student=x", "teacher.model=y", "data.paths=[p.jsonl]"]
    cfg = load_config(None, base)
    assert (cfg.model.recompute, cfg.parallel.sequence_parallel, cfg.model.apply_rope_fusion) == ("none", "auto", "auto")
    cfg = load_config(None, [*base, "model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2",
                             "model.bias_dropout_fusion=false", "parallel.tp=2", "parallel.sequence_parallel=true"])
    assert ModelOptions.from_config(cfg) == ModelOptions(
        layer_impl="auto", recompute="full", recompute_method="block", recompute_num_layers=2,
        bias_dropout_fusion=False, sequence_parallel=True)
    for override, field in (("model.recompute=true", "model.recompute"), ("model.recompute=partial", "model.recompute"),
                            ("model.recompute_method=every", "model.recompute_method"),
                            ("model.recompute_num_layers=0", "model.recompute_num_layers"),
                            ("model.apply_rope_fusion=maybe", "model.apply_rope_fusion"),
                            ("parallel.sequence_parallel=on", "parallel.sequence_parallel"),
                            ("parallel.sequence_parallel=true", "parallel.sequence_parallel")):  # at tp=1
        with pytest.raises(ConfigError) as err:
            load_config(None, [*base, override])
        assert err.value.field == field, override


def test_sequence_parallel_and_recompute_resolution():
    from scope_megatron.config import ConfigError
    from scope_megatron.model.builder import ModelOptions, recompute_settings, resolve_sequence_parallel, \
        sequence_length_multiple

    assert resolve_sequence_parallel("auto", 1) is False and resolve_sequence_parallel("auto", 2) is True
    assert resolve_sequence_parallel(False, 4) is False
    with pytest.raises(ConfigError) as err:
        resolve_sequence_parallel(True, 1)
    assert err.value.field == "parallel.sequence_parallel"
    assert [sequence_length_multiple(True, 2), sequence_length_multiple(True, 2, cp=2),
            sequence_length_multiple(False, 2), sequence_length_multiple(True, 1)] == [2, 8, 1, 1]
    assert recompute_settings(ModelOptions(), 4) == {}
    assert recompute_settings(ModelOptions(recompute="selective"), 4) == {
        "recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    assert recompute_settings(ModelOptions(recompute="full", recompute_method="block", recompute_num_layers=3), 4) == {
        "recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 3}
    with pytest.raises(ConfigError) as err:
        recompute_settings(ModelOptions(recompute="full", recompute_num_layers=5), 4)
    assert err.value.field == "model.recompute_num_layers"


# ------------------------------------------------------------------------------------------------ training steps
def _batch(vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    seqs = []
    for i, n in enumerate(SEQ_LENS):
        ids = torch.randint(1, vocab, (n + 1,), generator=gen)
        mask = torch.ones(n, dtype=torch.bool)
        mask[: 1 + i] = False
        seqs.append({"tokens": ids[:-1], "targets": ids[1:], "response_mask": mask})
    return seqs


def _nll_share(logits, mb, vocab: int, total: float):
    from scope_megatron.objective import vocab_parallel_logprobs

    lp = vocab_parallel_logprobs(logits, mb.fields.targets, vocab_size=vocab)
    return -(lp * mb.fields.response_mask).sum() / total, {"tokens": mb.fields.response_mask.sum()}


def _step(arch, ckpt, options, micro_batches, total) -> dict:
    from functools import partial

    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import build_gpt_model

    model = build_gpt_model(arch, perform_initialization=False, options=options)
    checkpoint.load_model(model, ckpt)
    config = model.config
    marked = sorted(name for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    ddp, opt, sched = wrap_for_training(model, lr=1e-3, clip_grad=1e6, use_distributed_optimizer=False)
    res = train_step(ddp, opt, sched, micro_batches, partial(_nll_share, vocab=arch.vocab_size, total=total))
    return {"loss": res.loss, "grad_norm": res.grad_norm,
            "grads": {n: p.main_grad.detach().clone() for n, p in model.named_parameters()},
            "granularity": config.recompute_granularity, "method": config.recompute_method,
            "sequence_parallel": config.sequence_parallel, "marked": marked,
            "widths": [mb.tokens.shape[1] for mb in micro_batches]}


def _worker(rank: int, world: int, ckpt: str) -> dict:
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import ModelOptions, sequence_length_multiple
    from scope_megatron.packing import build_packed_micro_batches, pad_sequences
    from scope_megatron.parallel import init_parallel

    arch, _ = checkpoint.read_meta(ckpt)
    seqs = _batch(arch.vocab_size)
    total = float(sum(s["response_mask"].sum() for s in seqs))
    out: dict = {}
    for tp, sp in ((1, False), (2, False), (2, True)):
        layout = init_parallel(tp, 1)
        multiple = sequence_length_multiple(sp, tp)
        mine = list(range(len(seqs)))[layout.dp_rank::layout.dp]
        padded = [pad_sequences([seqs[i]], trajectory_index=[i], length_multiple=multiple) for i in mine]
        for recompute, method, layers in RECOMPUTE_VARIANTS:
            options = ModelOptions(layer_impl="local_sdpa", recompute=recompute, recompute_method=method,
                                   recompute_num_layers=layers, sequence_parallel=sp)
            out[(tp, sp, recompute, method, layers)] = _step(arch, ckpt, options, padded, total)
        packed = build_packed_micro_batches(seqs, max_tokens=24, dp=layout.dp, dp_rank=layout.dp_rank,
                                            total_multiple=multiple)
        out[(tp, sp, "packed")] = _step(arch, ckpt, ModelOptions(layer_impl="local_sdpa", sequence_parallel=sp),
                                        packed, total)
        out[(tp, sp, "packed_full")] = _step(arch, ckpt, ModelOptions(layer_impl="local_sdpa", sequence_parallel=sp,
                                                                      recompute="full"), packed, total)
    return out


@pytest.fixture(scope="module")
def results(converted_models):
    _, ckpt = converted_models["qwen3"]
    return run_ranks(_worker, world_size=2, args=(str(ckpt),), timeout=400)


def _assert_grads_close(a: dict, b: dict, rel: float):
    assert set(a) == set(b)
    for name in a:
        scale = b[name].abs().max().item() + 1e-12
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= rel * scale + 1e-9, f"{name}: max diff {diff} vs scale {scale}"


@pytest.mark.parametrize("tp,sp", [(1, False), (2, True)], ids=["tp1", "tp2-sp"])
@pytest.mark.parametrize("variant", RECOMPUTE_VARIANTS[1:], ids=lambda v: "-".join(map(str, v)))
def test_recompute_gradients_equal_no_recompute(tp, sp, variant, results):
    for rank_out in results:
        base = rank_out[(tp, sp, "none", "uniform", 1)]
        got = rank_out[(tp, sp, *variant)]
        assert got["granularity"] == variant[0]
        assert got["method"] == (variant[1] if variant[0] == "full" else None)
        assert got["loss"] == pytest.approx(base["loss"], rel=1e-7)
        assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-6)
        _assert_grads_close(got["grads"], base["grads"], rel=1e-6)


def test_full_recompute_on_packed_rows(results):
    for rank_out in results:
        for tp, sp in ((1, False), (2, True)):
            _assert_grads_close(rank_out[(tp, sp, "packed_full")]["grads"], rank_out[(tp, sp, "packed")]["grads"],
                                rel=1e-6)


def test_sequence_parallel_matches_tp2_and_tp1(results):
    for rank_out in results:
        tp1 = rank_out[(1, False, "none", "uniform", 1)]
        plain = rank_out[(2, False, "none", "uniform", 1)]
        sp = rank_out[(2, True, "none", "uniform", 1)]
        assert (plain["sequence_parallel"], sp["sequence_parallel"]) == (False, True)
        assert all(w % 2 == 0 for w in sp["widths"]) and any(w % 2 for w in plain["widths"])
        # every RMSNorm weight (input, pre-MLP, q/k, final) is marked for the TP all-reduce under SP, none without
        assert plain["marked"] == [] and sp["marked"] == sorted(n for n in sp["grads"] if "norm" in n)
        for other in (plain, tp1):
            assert sp["loss"] == pytest.approx(other["loss"], rel=1e-6)
            assert sp["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-5)
        _assert_grads_close(sp["grads"], plain["grads"], rel=1e-5)
        packed_sp, packed_tp1 = rank_out[(2, True, "packed")], rank_out[(1, False, "packed")]
        assert all(w % 2 == 0 for w in packed_sp["widths"])
        assert packed_sp["loss"] == pytest.approx(tp1["loss"], rel=1e-6)
        assert packed_sp["grad_norm"] == pytest.approx(packed_tp1["grad_norm"], rel=1e-5)
        _assert_grads_close(packed_sp["grads"], rank_out[(2, False, "packed")]["grads"], rel=1e-5)
