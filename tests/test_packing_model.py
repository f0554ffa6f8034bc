"""Packed (THD) micro-batches through the real model, schedule, DDP and optimizer, on 4 gloo ranks.

References: HF transformers run on each sequence alone (per-token log-probs, loss, grad norm), and
megatron's padded path (per-parameter gradients). Checked at TP1 x DP4 and TP2 x DP2, with the
SDPA spec (PackedSeqParams, per-sequence SDPA), megatron's unfused local spec and SDPA fed a
block-diagonal causal mask, for several token budgets (the smallest leaves some DP ranks with
filler micro-batches); a batch of one sequence (three ranks only run fillers); context
parallelism (CP2 with DP2, with TP2, with PP2) against HF and against CP1's gradients; and TP2 with
sequence parallelism (packed rows padded to a multiple of TP, padded rows, and with CP2) against HF
and against TP2's gradients without it.
One spawn of 4 processes runs everything (process start-up dominates the run time).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks

LR = 1e-3
# (prompt length, response length): mixed lengths, a 1-token response, a 1-token sequence
SHAPES = [(5, 33), (3, 4), (1, 1), (6, 16), (2, 1), (8, 43), (2, 2), (4, 6), (4, 19), (3, 11), (2, 11), (6, 25)]
BUDGETS = [16, 48, 4096]  # 16: six sequences exceed it (each goes alone); 4096: one micro-batch per rank
CP_LAYOUTS = [(1, 1, 2), (2, 1, 2), (1, 2, 2)]  # (tp, pp, cp); DP = 4 / (tp * pp * cp)
WORLD = 4


def _sequences(vocab: int, shapes=SHAPES) -> list[dict[str, torch.Tensor]]:
    """tokens / targets / response mask per sequence: P + R - 1 positions, loss on the R response targets."""
    gen = torch.Generator().manual_seed(11)
    seqs = []
    for i, (p, r) in enumerate(shapes):
        # not id 0: HF's embedding keeps the pad row at zero (padding_idx), where RMSNorm's gradient is ~1/sqrt(eps)
        ids = torch.randint(1, vocab, (p + r,), generator=gen)
        n = p + r - 1
        mask = torch.zeros(n, dtype=torch.bool)
        mask[p - 1:] = True
        seqs.append({"tokens": ids[:-1], "targets": ids[1:], "response_mask": mask})
    return seqs


def _weight(trajectory):
    """A per-trajectory loss weight (looked up for the wrong tokens -> wrong loss): 1 + 0.25 i."""
    return 1.0 + 0.25 * trajectory


def _loss_share(logits, mb, vocab: int, total: float):
    from scope_megatron.objective import vocab_parallel_logprobs

    lp = vocab_parallel_logprobs(logits, mb.fields.targets, vocab_size=vocab)
    share = -(lp * _weight(mb.fields.trajectory_of_tokens()) * mb.fields.response_mask).sum() / total
    return share, {"tokens": mb.fields.response_mask.sum()}


def _run(arch, ckpt, impl, micro_batches, total, logprobs: bool = False, options=None):
    """Build and load the model; optionally a forward-only pass (per-sequence log-probs); then one train step."""
    from functools import partial

    from scope_megatron.batch import PackedMicroBatch
    from scope_megatron.megatron_step import run_forward, train_step, wrap_for_training
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.objective import vocab_parallel_logprobs
    from scope_megatron.packing import gather_from_context_parallel, unpack

    model = build_gpt_model(arch, perform_initialization=False, impl=impl, options=options)
    checkpoint.load_model(model, ckpt)
    per_seq = {}
    if logprobs:
        outs = run_forward(model, micro_batches, lambda logits, mb: vocab_parallel_logprobs(
            logits, mb.fields.targets, vocab_size=arch.vocab_size))
        for mb, lp in zip(micro_batches, outs):
            if isinstance(mb, PackedMicroBatch):
                full_lp = gather_from_context_parallel(lp, mb)  # a collective: every CP rank, every micro-batch
                if not gather_from_context_parallel(mb.fields.response_mask, mb).any():
                    continue  # a filler
                pieces = unpack(full_lp, mb)
                lengths = mb.seq_lengths.tolist()
            else:
                # every response runs to the end of its sequence: the last loss token ends it
                pieces, lengths = list(lp), [int(row.nonzero().max()) + 1 for row in mb.fields.response_mask]
            for row, piece, n in zip(mb.fields.trajectory_index.tolist(), pieces, lengths):
                per_seq[row] = piece[:n].clone()
    ddp, opt, sched = wrap_for_training(model, lr=LR, clip_grad=1e6, use_distributed_optimizer=False)
    res = train_step(ddp, opt, sched, micro_batches, partial(_loss_share, vocab=arch.vocab_size, total=total))
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    return {"loss": res.loss, "grad_norm": res.grad_norm, "tokens": res.report["tokens"],
            "num_loss_tokens": res.num_loss_tokens, "grads": grads, "logprobs": per_seq,
            "config_cp": model.config.context_parallel_size, "config_sp": model.config.sequence_parallel,
            "widths": [mb.tokens.shape[1] for mb in micro_batches]}


def _padded(seqs, rows, length_multiple: int = 1):
    from scope_megatron.packing import pad_sequences

    return pad_sequences([seqs[i] for i in rows], trajectory_index=rows, length_multiple=length_multiple)


def _worker(rank: int, world: int, ckpt: str) -> dict:
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.packing import build_packed_micro_batches
    from scope_megatron.parallel import init_parallel

    out = {}
    for tp in (1, 2):
        layout = init_parallel(tp, 1)
        arch, _ = checkpoint.read_meta(ckpt)
        seqs = _sequences(arch.vocab_size)
        total = float(sum(s["response_mask"].sum() for s in seqs))
        # padded baseline: sequences dealt round-robin, two padded micro-batches per rank
        mine = list(range(len(seqs)))[layout.dp_rank::layout.dp]
        half = (len(mine) + 1) // 2
        padded = [_padded(seqs, mine[:half]), _padded(seqs, mine[half:])]
        out[(tp, "padded", "local_sdpa")] = _run(arch, ckpt, "local_sdpa", padded, total, logprobs=True)
        for budget in BUDGETS:
            packed = build_packed_micro_batches(seqs, max_tokens=budget, dp=layout.dp, dp_rank=layout.dp_rank)
            out[(tp, budget, "count")] = len(packed)
            out[(tp, budget, "local_sdpa")] = _run(arch, ckpt, "local_sdpa", packed, total, logprobs=budget == BUDGETS[1])
        # megatron's own unfused attention, fed a block-diagonal causal mask; and that mask on SDPA
        packed = build_packed_micro_batches(seqs, max_tokens=BUDGETS[1], dp=layout.dp, dp_rank=layout.dp_rank)
        out[(tp, BUDGETS[1], "local")] = _run(arch, ckpt, "local", packed, total, logprobs=True)
        masked = build_packed_micro_batches(seqs, max_tokens=BUDGETS[1], dp=layout.dp, dp_rank=layout.dp_rank,
                                            attention="mask")
        out[(tp, BUDGETS[1], "sdpa_mask")] = _run(arch, ckpt, "local_sdpa", masked, total, logprobs=True)
        if tp == 1:  # per-sequence slots padded to a multiple of 4 (as for context parallelism), the row to 16
            slotted = build_packed_micro_batches(seqs, max_tokens=BUDGETS[1], dp=layout.dp, dp_rank=layout.dp_rank,
                                                 seq_multiple=4, total_multiple=16)
            out[(tp, "slotted", "local_sdpa")] = _run(arch, ckpt, "local_sdpa", slotted, total, logprobs=True)
        if tp == 2:
            out.update(_sequence_parallel_runs(arch, ckpt, seqs, total, layout, mine, half))

    # one sequence, four DP ranks: three ranks only have a filler micro-batch (no loss tokens): no hang
    layout = init_parallel(1, 1)
    arch, _ = checkpoint.read_meta(ckpt)
    one = _sequences(arch.vocab_size)[:1]
    total = float(one[0]["response_mask"].sum())
    packed = build_packed_micro_batches(one, max_tokens=64, dp=layout.dp, dp_rank=layout.dp_rank)
    out["filler_counts"] = [mb.num_loss_tokens for mb in packed]
    out["filler"] = _run(arch, ckpt, "local_sdpa", packed, total)

    # context parallelism: each CP rank holds chunks r and 2cp-1-r of every packed sequence; the model
    # config says context_parallel_size = cp (builder.transformer_config reads it from parallel_state).
    for tp, pp, cp in CP_LAYOUTS:
        layout = init_parallel(tp, pp, cp=cp)
        assert (layout.cp, layout.dp) == (cp, world // (tp * pp * cp))
        seqs = _sequences(arch.vocab_size)
        total = float(sum(s["response_mask"].sum() for s in seqs))
        packed = build_packed_micro_batches(seqs, max_tokens=BUDGETS[1], dp=layout.dp, dp_rank=layout.dp_rank,
                                            cp_size=cp, cp_rank=layout.cp_rank)
        res = _run(arch, ckpt, "local_sdpa", packed, total, logprobs=True)
        assert build_gpt_model(arch, perform_initialization=False).config.context_parallel_size == cp
        res["local_tokens"] = [mb.tokens.shape[1] for mb in packed]
        res["row_tokens"] = [int(mb.slot_bounds[-1]) for mb in packed]
        out[("cp", tp, pp, cp)] = res
        if (tp, pp) == (1, 1):  # padded rows cannot be split over CP ranks: refused, not silently wrong
            from scope_megatron.megatron_step import run_forward

            model = build_gpt_model(arch, perform_initialization=False, impl="local_sdpa")
            try:
                run_forward(model, [_padded(seqs, [0, 1])])
                out["cp_padded_error"] = None
            except NotImplementedError as exc:
                out["cp_padded_error"] = str(exc)
    return out


def _sequence_parallel_runs(arch, ckpt, seqs, total, layout, mine, half) -> dict:
    """TP2 + SP: packed rows padded to a multiple of TP, padded rows likewise; then TP2 x CP2 + SP."""
    from scope_megatron.model.builder import ModelOptions, sequence_length_multiple
    from scope_megatron.packing import build_packed_micro_batches
    from scope_megatron.parallel import init_parallel

    sp = ModelOptions(sequence_parallel=True)
    multiple = sequence_length_multiple(True, layout.tp)
    out = {}
    packed = build_packed_micro_batches(seqs, max_tokens=BUDGETS[1], dp=layout.dp, dp_rank=layout.dp_rank,
                                        total_multiple=multiple)
    out[(2, BUDGETS[1], "local_sdpa_sp")] = _run(arch, ckpt, "local_sdpa", packed, total, logprobs=True, options=sp)
    padded = [_padded(seqs, mine[:half], multiple), _padded(seqs, mine[half:], multiple)]
    out[(2, "padded_sp", "local_sdpa")] = _run(arch, ckpt, "local_sdpa", padded, total, logprobs=True, options=sp)
    cp_layout = init_parallel(2, 1, cp=2)
    packed = build_packed_micro_batches(seqs, max_tokens=BUDGETS[1], dp=cp_layout.dp, dp_rank=cp_layout.dp_rank,
                                        cp_size=2, cp_rank=cp_layout.cp_rank,
                                        total_multiple=sequence_length_multiple(True, 2, cp=2))
    out[("cp_sp", 2, 1, 2)] = _run(arch, ckpt, "local_sdpa", packed, total, logprobs=True, options=sp)
    init_parallel(2, 1)
    return out


def _hf_reference(hf_dir, shapes=SHAPES) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    seqs = _sequences(model.config.vocab_size, shapes)
    total = sum(s["response_mask"].sum() for s in seqs)
    loss, logprobs = 0.0, {}
    for i, s in enumerate(seqs):
        logp = model(s["tokens"][None]).logits[0].log_softmax(-1).gather(-1, s["targets"][:, None])[:, 0]
        logprobs[i] = logp.detach()
        loss = loss + -(logp * _weight(i) * s["response_mask"]).sum() / total
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
    return {"loss": loss.item(), "grad_norm": grad_norm, "logprobs": logprobs, "tokens": float(total)}


@pytest.fixture(scope="module")
def results(converted_models):
    hf_dir, ckpt = converted_models["qwen3"]
    per_rank = run_ranks(_worker, world_size=WORLD, args=(str(ckpt),), timeout=600)
    one = _hf_reference(hf_dir, SHAPES[:1])
    return _hf_reference(hf_dir), one, per_rank


def _close_grads(a: dict, b: dict, rel: float = 1e-5):
    assert set(a) == set(b)
    for name in a:
        scale = b[name].abs().max().item() + 1e-12
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= rel * scale + 1e-9, f"{name}: max diff {diff} vs scale {scale}"


LOGPROB_VARIANTS = [(BUDGETS[1], "local_sdpa"), (BUDGETS[1], "local"), (BUDGETS[1], "sdpa_mask"),
                    ("slotted", "local_sdpa"), (BUDGETS[1], "local_sdpa_sp"), ("padded_sp", "local_sdpa")]


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_logprobs_match_hf_per_sequence(tp, results):
    ref, _, per_rank = results
    padded = {row: lp for rank_out in per_rank for row, lp in rank_out[(tp, "padded", "local_sdpa")]["logprobs"].items()}
    assert set(padded) == set(range(len(SHAPES)))
    for variant in LOGPROB_VARIANTS:
        if (tp, *variant) not in per_rank[0]:
            continue
        seen = set()
        for rank_out in per_rank:
            got = rank_out[(tp, *variant)]["logprobs"]
            for row, lp in got.items():
                assert lp.shape == ref["logprobs"][row].shape, (variant, row)
                torch.testing.assert_close(lp, ref["logprobs"][row], atol=2e-5, rtol=0)
                torch.testing.assert_close(lp, padded[row], atol=2e-5, rtol=0)
            seen |= set(got)
        assert seen == set(range(len(SHAPES))), variant  # every sequence came back from some DP rank


STEP_VARIANTS = [(tp, budget, "local_sdpa") for tp in (1, 2) for budget in BUDGETS] + [
    (tp, BUDGETS[1], impl) for tp in (1, 2) for impl in ("local", "sdpa_mask")] + [(1, "slotted", "local_sdpa")] + [
    (2, BUDGETS[1], "local_sdpa_sp"), (2, "padded_sp", "local_sdpa")]  # sequence parallelism


@pytest.mark.parametrize("tp,budget,impl", STEP_VARIANTS, ids=lambda v: str(v))
def test_packed_step_matches_padded_and_hf(tp, budget, impl, results):
    ref, _, per_rank = results
    variant = (budget, impl)
    for rank_out in per_rank:
        padded = rank_out[(tp, "padded", "local_sdpa")]
        got = rank_out[(tp, *variant)]
        assert padded["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert padded["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert got["tokens"] == got["num_loss_tokens"] == ref["tokens"]
        _close_grads(got["grads"], padded["grads"])


@pytest.mark.parametrize("tp", [1, 2])
def test_budgets_change_micro_batch_count_not_result(tp, results):
    _, _, per_rank = results
    counts = [per_rank[0][(tp, b, "count")] for b in BUDGETS]
    assert counts[0] > counts[1] > counts[2] == 1  # the budgets really regroup the sequences
    for rank_out in per_rank:
        # the same number of micro-batches on every DP rank, whatever each holds
        assert [rank_out[(tp, b, "count")] for b in BUDGETS] == counts
        base = rank_out[(tp, BUDGETS[-1], "local_sdpa")]
        for b in BUDGETS[:-1]:
            got = rank_out[(tp, b, "local_sdpa")]
            assert got["loss"] == pytest.approx(base["loss"], rel=1e-6)
            _close_grads(got["grads"], base["grads"])


def test_rank_with_only_a_filler_micro_batch(results):
    _, one, per_rank = results
    assert sorted(c for r in per_rank for c in r["filler_counts"]) == [0, 0, 0, one["tokens"]]
    for rank_out in per_rank:
        got = rank_out["filler"]
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
        assert got["num_loss_tokens"] == one["tokens"]


@pytest.mark.parametrize("layout", CP_LAYOUTS, ids=lambda l: f"tp{l[0]}-pp{l[1]}-cp{l[2]}")
def test_context_parallel_matches_hf(layout, results):
    ref, _, per_rank = results
    seen = set()
    for rank_out in per_rank:
        got = rank_out[("cp", *layout)]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        assert got["num_loss_tokens"] == ref["tokens"]
        assert got["config_cp"] == layout[2]
        assert "needs packed micro-batches" in rank_out["cp_padded_error"]
        # CP really split the rows: each rank held half of every packed row
        assert [2 * n for n in got["local_tokens"]] == got["row_tokens"]
        for row, lp in got["logprobs"].items():
            torch.testing.assert_close(lp, ref["logprobs"][row], atol=2e-5, rtol=0)
            seen.add(row)
    assert seen == set(range(len(SHAPES)))


def test_context_parallel_gradients_equal_cp1(results):
    _, _, per_rank = results
    for rank_out in per_rank:  # TP1: CP2 x DP2 against CP1 x DP4, same budget
        _close_grads(rank_out[("cp", 1, 1, 2)]["grads"], rank_out[(1, BUDGETS[1], "local_sdpa")]["grads"])


def test_sequence_parallel_rows_are_padded_to_tp_and_match_hf(results):
    ref, _, per_rank = results
    for rank_out in per_rank:
        for key in ((2, BUDGETS[1], "local_sdpa_sp"), (2, "padded_sp", "local_sdpa"), ("cp_sp", 2, 1, 2)):
            got = rank_out[key]
            assert got["config_sp"], key
            assert all(w % 2 == 0 for w in got["widths"]), (key, got["widths"])  # CP: each rank's half too
        assert not rank_out[(2, BUDGETS[1], "local_sdpa")]["config_sp"]
        # padded rows: the widths without SP, rounded up to a multiple of TP
        assert rank_out[(2, "padded_sp", "local_sdpa")]["widths"] == [
            w + w % 2 for w in rank_out[(2, "padded", "local_sdpa")]["widths"]]
        cp_sp = rank_out[("cp_sp", 2, 1, 2)]
        assert cp_sp["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert cp_sp["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        for row, lp in cp_sp["logprobs"].items():
            torch.testing.assert_close(lp, ref["logprobs"][row], atol=2e-5, rtol=0)
        # the same per-parameter gradients as TP2 without SP (TP2 x CP2 + SP against TP2 x CP2)
        _close_grads(rank_out[(2, BUDGETS[1], "local_sdpa_sp")]["grads"], rank_out[(2, BUDGETS[1], "local_sdpa")]["grads"])
        _close_grads(cp_sp["grads"], rank_out[("cp", 2, 1, 2)]["grads"])
