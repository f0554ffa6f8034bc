"""Packed (THD, token-budget) vs padded micro-batches: padding avoided, DP balance and step time.

    python bench/packing.py                       # CPU: lengths scaled down 32x, a small model
    python bench/packing.py --scale 1 --model qwen3-0.6b --dtype bfloat16 --max-tokens 16384   # GPU

Lengths: a long-tailed (log-normal) distribution of prompt + response lengths with mean ~4k and a
cap of 16k tokens, as in long reasoning traces. The padding and balance statistics are computed on
the full-size lengths (pure arithmetic). The step times run on the lengths divided by ``--scale``
(and the token budget with them), so a CPU finishes in a minute or two; they compare layouts on
the same machine and model, not absolute speed.

Layouts: ``padded`` = ``--micro-batch-size`` sequences per micro-batch in batch order, each padded
to its longest (what a trainer that groups a prompt's rollouts gets); ``padded_sorted`` = the same
after sorting by length (the trainer's layout without a token budget, and the best a padded layout
does); ``pad_to_longest`` = every sequence padded to the longest of the batch; ``packed`` =
token-budget THD micro-batches (the trainer with ``parallel.max_tokens_per_microbatch``). Prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sample_lengths(n: int, mean: float, cap: int, sigma: float, seed: int, floor: int = 64) -> list[int]:
    """Log-normal lengths with the given mean (before capping), clipped to [floor, cap]."""
    rng = random.Random(seed)
    mu = math.log(mean) - sigma ** 2 / 2
    return [min(cap, max(floor, int(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def padded_groups(lengths: list[int], b: int, sort: bool) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    return [order[i:i + b] for i in range(0, len(order), b)]


def layout_stats(lengths: list[int], b: int, max_tokens: int, dp: int) -> dict:
    from scope_megatron.packing import partition_balanced, plan_packed

    real = sum(lengths)

    def summary(computed: int) -> dict:
        return {"computed_tokens": computed, "padding_fraction": round(1 - real / computed, 4)}

    out = {"real_tokens": real, "sequences": len(lengths), "mean_length": round(real / len(lengths), 1),
           "max_length": max(lengths)}
    padded = sum(len(g) * max(lengths[i] for i in g) for g in padded_groups(lengths, b, sort=False))
    padded_sorted = sum(len(g) * max(lengths[i] for i in g) for g in padded_groups(lengths, b, sort=True))
    out["pad_to_longest"] = summary(len(lengths) * max(lengths))
    out["padded"] = summary(padded)
    out["padded_sorted"] = summary(padded_sorted)
    plan = plan_packed(lengths, max_tokens=max_tokens, dp=dp)
    out["packed"] = {**summary(real), "micro_batches_per_rank": plan.num_micro_batches,
                     "max_tokens_per_microbatch": max_tokens}
    packed_padding = 0  # slots are not padded here (seq_multiple = 1)
    for name, computed in (("padded", padded), ("padded_sorted", padded_sorted)):
        out[f"padding_tokens_avoided_vs_{name}"] = round(1 - packed_padding / (computed - real), 4) if computed > real else None
        out[f"computed_tokens_saved_vs_{name}"] = round(1 - real / computed, 4)
    # DP balance: tokens per rank, max / mean (1.0 = perfect)
    for name, parts in (("karmarkar_karp", partition_balanced(lengths, dp)),
                        ("greedy", partition_balanced(lengths, dp, "greedy")),
                        ("round_robin_by_length", [sorted(range(len(lengths)), key=lambda i: -lengths[i])[r::dp]
                                                   for r in range(dp)])):
        sums = [sum(lengths[i] for i in p) for p in parts]
        out.setdefault(f"dp{dp}_max_over_mean_tokens", {})[name] = round(max(sums) / (sum(sums) / dp), 4)
    return out


def build_model(args, dtype):
    from scope_megatron.model.arch import arch_from_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.examples.tiny_models import tiny_hf_config

    if args.model == "small":
        cfg = tiny_hf_config("qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                             max_position_embeddings=65536).to_dict()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from train_step import hf_config_dict

        cfg = hf_config_dict(args.model)
    arch = arch_from_hf_config(cfg)
    return arch, build_gpt_model(arch, params_dtype=dtype, impl=args.impl)


def time_steps(lengths: list[int], args) -> dict:
    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.objective import vocab_parallel_logprobs
    from scope_megatron.packing import build_packed_micro_batches, pad_sequences
    from scope_megatron.parallel import init_parallel

    init_parallel(1, 1)
    dtype = getattr(torch, args.dtype)
    arch, model = build_model(args, dtype)
    ddp, opt, sched = wrap_for_training(model, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for n in lengths:
        ids = torch.randint(1, arch.vocab_size, (n + 1,), generator=gen)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 4:] = True  # a quarter prompt
        seqs.append({"tokens": ids[:-1], "targets": ids[1:], "response_mask": mask})
    total = float(sum(int(s["response_mask"].sum()) for s in seqs))

    def loss_fn(logits, mb):
        lp = vocab_parallel_logprobs(logits, mb.fields.targets, vocab_size=arch.vocab_size, check_finite=False)
        return -(lp * mb.fields.response_mask).sum() / total, {}

    layouts = {
        "padded": [pad_sequences([seqs[i] for i in g]) for g in padded_groups(lengths, args.micro_batch_size, False)],
        "padded_sorted": [pad_sequences([seqs[i] for i in g]) for g in padded_groups(lengths, args.micro_batch_size, True)],
        "packed": build_packed_micro_batches(seqs, max_tokens=args.max_tokens // args.scale),
    }
    out = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for name in args.layouts.split(","):
        mbs = layouts[name]
        times = []
        for step in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            train_step(ddp, opt, sched, mbs, loss_fn)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        out[name] = {"micro_batches": len(mbs), "computed_tokens": int(sum(mb.tokens.numel() for mb in mbs)),
                     "step_s": round(median, 4), "real_tokens_per_s": round(sum(lengths) / median, 1)}
    if "packed" in out:
        for name in ("padded", "padded_sorted"):
            if name in out:
                out[f"speedup_packed_vs_{name}"] = round(out[name]["step_s"] / out["packed"]["step_s"], 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=64, help="sequences in the global batch")
    p.add_argument("--mean", type=float, default=4096)
    p.add_argument("--cap", type=int, default=16384)
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma (tail weight)")
    p.add_argument("--scale", type=int, default=32, help="divide lengths by this for the timed steps")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per padded micro-batch")
    p.add_argument("--max-tokens", type=int, default=16384, help="packed token budget (full-size tokens)")
    p.add_argument("--dp", type=int, default=8, help="DP size for the balance statistics")
    p.add_argument("--model", default="small", help="small (CPU), or a bench/train_step.py preset / config.json")
    p.add_argument("--impl", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layouts", default="padded,padded_sorted,packed")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    lengths = sample_lengths(args.sequences, args.mean, args.cap, args.sigma, args.seed)
    result = {"lengths": {"distribution": f"lognormal(mean {args.mean:g}, sigma {args.sigma}) clipped to "
                                          f"[64, {args.cap}]", "seed": args.seed},
              "full_size": layout_stats(lengths, args.micro_batch_size, args.max_tokens, args.dp)}
    scaled = [max(1, n // args.scale) for n in lengths]
    result["timed"] = {"scale": f"lengths / {args.scale}", "model": args.model, "dtype": args.dtype,
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "real_tokens": sum(scaled), "max_length": max(scaled),
                       "max_tokens_per_microbatch": args.max_tokens // args.scale, **time_steps(scaled, args)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
