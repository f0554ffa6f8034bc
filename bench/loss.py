"""Benchmark: log-probs + SCOPE loss + backward over a large vocabulary.

Prints one JSON line per (variant, token count): wall time and the extra peak memory beyond
the logits themselves (the logits' gradient counts as extra), for

* ``naive``: fp32 ``log_softmax`` of the full logits, gather, loss, backward;
* ``megatron_ce``: megatron-core's ``vocab_parallel_cross_entropy`` (log p = -CE), loss, backward;
* ``scope``: this package's ``vocab_parallel_logprobs`` (with entropy) + ``objective_loss``, with
  the device's default kernels (torch.compile'd on CUDA, eager on CPU);
* ``scope_no_entropy``: the same without the entropy;
* ``scope_eager`` / ``scope_fused``: ``scope`` with ``fused=False`` / ``fused=True`` forced
  (on CPU, ``scope_fused`` spends about a minute compiling; not run by default there).

All variants see the same bf16 logits [B, S, V] and optimise the same SCOPE loss; TP = 1.
On a GPU the defaults are the issue's sizes (4096 and 16384 tokens, V = 151,936) and memory is
``torch.cuda.max_memory_allocated``; on CPU the default is smaller (512 tokens) and memory is the
process's peak resident set (VmHWM, reset after setup; glibc's mmap threshold fixed so freed
buffers leave the resident set), each variant in its own process.

Usage: ``python bench/loss.py [--tokens 512 2048] [--vocab 151936] [--repeats 3] [--variants ...]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("bench.loss")

VARIANTS = ("naive", "megatron_ce", "scope", "scope_no_entropy", "scope_eager", "scope_fused")
CPU_DEFAULT_VARIANTS = ("naive", "megatron_ce", "scope", "scope_no_entropy")
GIB = 1024 ** 3


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def run_variant(variant: str, tokens: int, vocab: int, repeats: int, device_name: str) -> dict:
    import torch

    from scope_megatron.objective import ObjectiveConfig, objective_loss, plan_batch, vocab_parallel_logprobs

    device = torch.device(device_name)
    torch.manual_seed(0)
    seq_len = min(tokens, 512)
    batch = max(1, tokens // seq_len)
    shape = (batch, seq_len)
    logits = torch.randn(*shape, vocab, dtype=torch.bfloat16, device=device)
    targets = torch.randint(0, vocab, shape, device=device)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    teacher = torch.full(shape, -2.0, device=device)
    group_ids = torch.arange(batch, device=device) // 8
    correct = torch.arange(batch, device=device) % 2 == 0
    config = ObjectiveConfig()
    plan = plan_batch(config, group_ids=group_ids, response_lengths=mask.sum(1), correct=correct,
                      student_logprob_mean=torch.full((batch,), -1.0, device=device),
                      teacher_logprob_mean=torch.full((batch,), -1.5, device=device))

    ce_group = None
    if variant == "megatron_ce":
        import torch.distributed as dist
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

        if not dist.is_initialized():
            from tests.dist_utils import free_port

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                    init_method=f"tcp://127.0.0.1:{free_port()}")
        ce_group = dist.group.WORLD

    def step(x: torch.Tensor) -> None:
        entropy = None
        if variant == "naive":
            lp = torch.log_softmax(x.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        elif variant == "megatron_ce":
            lp = -vocab_parallel_cross_entropy(x, targets, tp_group=ce_group)
        elif variant in ("scope", "scope_eager", "scope_fused"):
            fused = {"scope": None, "scope_eager": False, "scope_fused": True}[variant]
            lp, entropy = vocab_parallel_logprobs(x, targets, vocab_size=vocab, return_entropy=True, check_finite=False,
                                                  fused=fused)
        else:
            lp = vocab_parallel_logprobs(x, targets, vocab_size=vocab, check_finite=False)
        out = objective_loss(config, plan.coefficients, plan.denominators, logprobs=lp, response_mask=mask,
                             teacher_logprobs=teacher, entropy=entropy, check_finite=False)
        out.loss.backward()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    x = logits.requires_grad_(True)
    step(x)  # warm-up
    x.grad = None
    sync()
    times = []
    extra_peak = 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_bytes("VmRSS")
            _reset_peak_rss()
        start = time.perf_counter()
        step(x)
        sync()
        times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes("VmHWM")
        extra_peak = max(extra_peak, peak - base)
        x.grad = None
    logits_bytes = logits.numel() * logits.element_size()
    return {
        "variant": variant,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens": tokens,
        "vocab": vocab,
        "logits_dtype": "bfloat16",
        "time_ms": round(1000 * statistics.median(times), 2),
        "extra_peak_gib": round(extra_peak / GIB, 3),
        "extra_peak_over_logits": round(extra_peak / logits_bytes, 3),
        "logits_gib": round(logits_bytes / GIB, 3),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device.startswith("cuda")
    tokens_list = args.tokens or ([4096, 16384] if on_gpu else [512])
    repeats = args.repeats or (10 if on_gpu else 3)
    variants = args.variants or (VARIANTS if on_gpu else CPU_DEFAULT_VARIANTS)

    if args.worker is not None:  # child process: one variant, one size
        print(json.dumps(run_variant(args.worker, tokens_list[0], args.vocab, repeats, args.device)))
        return 0

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # CPU memory: a fixed mmap threshold makes glibc return every large freed buffer at once, so the
    # resident set follows the live tensors; it also adds page faults, so time is taken in another run.
    memory_env = dict(env, MALLOC_MMAP_THRESHOLD_="131072")

    def child(variant: str, tokens: int, child_env: dict, child_repeats: int) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--tokens", str(tokens),
               "--vocab", str(args.vocab), "--repeats", str(child_repeats), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, cwd=repo)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"variant": variant, "tokens": tokens, "error": proc.stderr.strip().splitlines()[-3:]}
        return json.loads(lines[-1])

    for tokens in tokens_list:
        results = {}
        for variant in variants:
            record = child(variant, tokens, env, repeats)
            if not on_gpu and "error" not in record:
                memory = child(variant, tokens, memory_env, 1)
                for key in ("extra_peak_gib", "extra_peak_over_logits"):
                    record[key] = memory.get(key)
            results[variant] = record
        naive = results.get("naive", {})
        for record in results.values():
            if "extra_peak_gib" in record and naive.get("extra_peak_gib"):
                record["extra_peak_vs_naive"] = round(record["extra_peak_gib"] / naive["extra_peak_gib"], 3)
                record["time_vs_naive"] = round(record["time_ms"] / naive["time_ms"], 3)
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
