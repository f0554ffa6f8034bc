"""One training step through megatron-core's real schedule, DDP and (distributed) optimizer gives the
same loss, grad norm and updated weights at TP1PP1, TP2, PP2 and DP2, with 1 or 4 micro-batches,
as a plain single-process HF transformers + torch.optim.AdamW step on the same batch."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks

LR, WD, CLIP = 1e-3, 0.01, 0.5
# Adam's first step is lr * g / (|g| + eps): with eps = 1e-8 an element whose gradient is ~1e-8 turns
# float32 summation-order noise into visible update differences; 1e-6 keeps the comparison exact.
ADAM_EPS = 1e-6
# (tp, pp, micro-batches per DP rank, distributed optimizer) in a 2-rank world; DP = 2 / (tp * pp)
LAYOUTS = [(1, 1, 2, True), (2, 1, 1, True), (2, 1, 4, False), (1, 2, 4, True), (1, 2, 1, True)]
SEQ_LENS = [11, 7, 16, 5]  # four sequences of different lengths (one global batch)


def _global_batch(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Four sequences: tokens [s], next-token targets [s], loss mask [s] (prompt tokens masked)."""
    gen = torch.Generator().manual_seed(3)
    seqs = []
    for i, n in enumerate(SEQ_LENS):
        tokens = torch.randint(0, vocab, (n + 1,), generator=gen)
        mask = torch.ones(n)
        mask[: 1 + i] = 0  # a prompt of 1 + i tokens carries no loss
        seqs.append({"tokens": tokens[:-1], "targets": tokens[1:], "response_mask": mask})
    return seqs


def _pad_stack(seqs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    longest = max(s["tokens"].numel() for s in seqs)
    out = {}
    for key in ("tokens", "targets", "response_mask"):
        rows = [torch.nn.functional.pad(s[key], (0, longest - s[key].numel())) for s in seqs]
        out[key] = torch.stack(rows)
    return out


def _nll_share(logits: torch.Tensor, mb, vocab: int, total_tokens: int):
    """This micro-batch's share of the token-mean NLL: sum(-log p * mask) / global loss tokens."""
    from scope_megatron.objective import vocab_parallel_logprobs

    logprobs = vocab_parallel_logprobs(logits, mb.fields.targets, vocab_size=vocab)  # [b, s]
    share = -(logprobs * mb.fields.response_mask).sum() / total_tokens
    return share, {"tokens": mb.fields.response_mask.sum()}


def _train_worker(rank: int, world: int, ckpt: str) -> dict:
    from functools import partial

    from scope_megatron.batch import MicroBatch, TokenFields
    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.model.hf_io import export_hf_tensors
    from scope_megatron.parallel import init_parallel

    results = {}
    for tp, pp, n_mb, dist_opt in LAYOUTS:
        layout = init_parallel(tp, pp)
        arch, _ = checkpoint.read_meta(ckpt)
        model = build_gpt_model(arch, perform_initialization=False)
        checkpoint.load_model(model, ckpt)
        ddp_model, optimizer, scheduler = wrap_for_training(model, lr=LR, weight_decay=WD, clip_grad=CLIP,
                                                 adam_eps=ADAM_EPS, use_distributed_optimizer=dist_opt)
        seqs = _global_batch(arch.vocab_size)
        total_tokens = int(sum(s["response_mask"].sum() for s in seqs))
        mine = seqs[layout.dp_rank::layout.dp]  # this DP rank's sequences
        per_mb = -(-len(mine) // n_mb)
        micro_batches = []
        for i in range(0, len(mine), per_mb):
            stacked = _pad_stack(mine[i:i + per_mb])
            micro_batches.append(MicroBatch(stacked["tokens"], TokenFields(targets=stacked["targets"],
                                                                             response_mask=stacked["response_mask"]),
                                            int(stacked["response_mask"].sum())))
        assert len(micro_batches) == n_mb
        result = train_step(ddp_model, optimizer, scheduler, micro_batches,
                            partial(_nll_share, vocab=arch.vocab_size, total_tokens=total_tokens))
        weights = {name: t.clone() for name, t in export_hf_tensors(model, arch)}
        if rank == 0:
            results[(tp, pp, n_mb, dist_opt)] = {"loss": result.loss, "grad_norm": result.grad_norm,
                                                 "tokens": result.report["tokens"],
                                                 "num_loss_tokens": result.num_loss_tokens, "weights": weights}
    return results


def _reference_step(hf_dir) -> dict:
    """The same step in plain torch: HF model, full-vocab log_softmax, clip_grad_norm_, AdamW."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    initial = {n: p.detach().clone() for n, p in model.state_dict().items()}
    seqs = _global_batch(model.config.vocab_size)
    total_tokens = sum(s["response_mask"].sum() for s in seqs)
    loss = 0.0
    for s in seqs:
        logp = model(s["tokens"][None]).logits[0].log_softmax(-1)
        loss = loss + -(logp.gather(-1, s["targets"][:, None])[:, 0] * s["response_mask"]).sum() / total_tokens
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()
    # megatron's default: no weight decay on biases and 1-D parameters (norms)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=ADAM_EPS)
    opt.step()
    return {"loss": loss.item(), "grad_norm": grad_norm, "tokens": float(total_tokens),
            "weights": {n: p.detach().clone() for n, p in model.state_dict().items()}, "initial": initial}


@pytest.fixture(scope="module")
def step_results(converted_models):
    hf_dir, ckpt = converted_models["qwen3"]
    per_rank = run_ranks(_train_worker, world_size=2, args=(str(ckpt),), timeout=600)
    return _reference_step(hf_dir), per_rank[0]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"tp{l[0]}-pp{l[1]}-mb{l[2]}-{'distopt' if l[3] else 'opt'}")
def test_one_step_matches_single_process_reference(layout, step_results):
    reference, ours = step_results
    got = ours[layout]
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert got["grad_norm"] > CLIP  # so the clipping path was exercised
    assert got["tokens"] == reference["tokens"] == got["num_loss_tokens"]
    assert set(got["weights"]) == set(reference["weights"])
    for name, ref in reference["weights"].items():
        diff = (got["weights"][name] - ref).abs().max().item()
        assert diff < 2e-3 * LR, f"{name}: {diff}"  # a layout or mapping bug moves weights by ~LR
    # and the step did move the weights (Adam's first step moves each element by about LR)
    moved = max((reference["weights"][n] - w).abs().max().item() for n, w in reference["initial"].items())
    assert moved > 0.5 * LR


def _schedule_worker(rank: int, world: int) -> list[float]:
    from scope_megatron.batch import MicroBatch, TokenFields
    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model.arch import arch_from_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.objective import vocab_parallel_logprobs
    from scope_megatron.parallel import init_parallel
    from scope_megatron.examples.tiny_models import tiny_hf_config

    init_parallel(1, 1)
    arch = arch_from_hf_config(tiny_hf_config("qwen3").to_dict())
    ddp, opt, sched = wrap_for_training(build_gpt_model(arch), lr=1e-3, lr_warmup_steps=2, lr_decay_style="cosine",
                                        lr_decay_steps=6, min_lr=1e-5)
    tokens = torch.randint(0, arch.vocab_size, (2, 9))
    mb = MicroBatch(tokens[:, :-1], TokenFields(targets=tokens[:, 1:]), 16)

    def loss_fn(logits, batch):
        return -vocab_parallel_logprobs(logits, batch.fields.targets, vocab_size=arch.vocab_size).sum() / 16, {}

    return [train_step(ddp, opt, sched, [mb], loss_fn).learning_rate for _ in range(7)]


def test_warmup_then_cosine_schedule():
    import math

    lrs = run_ranks(_schedule_worker, world_size=1, timeout=300)[0]
    # linear warmup over 2 steps, then cosine from 1e-3 to 1e-5 over the remaining 4 of 6 decay steps
    expected = [0.0, 5e-4] + [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)
