"""``scope-megatron eval``: Avg@k / Pass@k of a model on math benchmarks.

Examples::

    # an HF checkpoint, served for the run by the embedded engine (transformers)
    scope-megatron eval --model ckpt/hf --benchmarks ../shared/data/math/benchmarks \\
        --n 32 --k 1,8,32 --out runs/eval_base

    # a running SGLang server (the tokenizer gives the chat template)
    scope-megatron eval --url http://127.0.0.1:30000 --tokenizer Qwen3-1.7B-dir \\
        --benchmarks aime24.jsonl aime25.jsonl --n 32 --k 32 --repetition-penalty 1.08 \\
        --estimator bootstrap --out runs/eval_q3

Outputs in ``--out``: ``records/<benchmark>.jsonl`` (every response, written as each problem
finishes; rerunning the same command resumes), ``results.json`` and ``results.md``. The table is
also printed, with the Pass@k estimator used.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .benchmarks import BenchmarkFormatError, load_benchmarks
from .metrics import ESTIMATORS, MetricError, parse_ks
from .runner import (EvalError, EvalServerError, EvalSettings, default_ks, pending_problems, results_markdown,
                     run_evaluation)


def build_arg_parser() -> argparse.ArgumentParser:
    """Flags of ``scope-megatron eval``."""
    p = argparse.ArgumentParser(
        prog="scope-megatron eval",
        description="Sample n responses per problem, grade them with math-verify, report Avg@k and Pass@k per "
                    "benchmark and their mean. Defaults are the paper's evaluation settings.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory, served for this run by the embedded engine")
    src.add_argument("--url", help="base URL of a running SGLang server (or scope-megatron serve)")
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="FILE",
                   help="benchmark jsonl files ({id, problem, answer, source} a line) or directories of them")
    p.add_argument("--out", required=True, help="output directory (records, results.json, results.md)")
    p.add_argument("--n", type=int, default=32, help="samples per problem (default 32)")
    p.add_argument("--k", default=None,
                   help="comma-separated k values, each <= n (default: those of 1,8,32 that are <= n, and n)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="unbiased",
                   help="Pass@k estimator: unbiased 1-C(n-c,k)/C(n,k) (default) or the reference code's bootstrap")
    p.add_argument("--bootstrap-draws", type=int, default=1000, help="draws of the bootstrap estimator (1000)")
    p.add_argument("--bootstrap-seed", type=int, default=42, help="seed of the bootstrap estimator (42)")
    g = p.add_argument_group("sampling (paper defaults)")
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=20, help="-1 = whole vocabulary")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--max-new-tokens", type=int, default=32768)
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="1.0 = off (the paper used 1.08 for Qwen3-1.7B-Base students)")
    g.add_argument("--seed", type=int, default=None, help="derive per-sample sampling seeds (reproducible runs)")
    g.add_argument("--prompt-format", choices=["paper", "reference"], default="paper",
                   help="paper: problem + ' Put your final answer within \\boxed{}.'; reference: the reference "
                        "code's suffix (no space, literal {{}})")
    s = p.add_argument_group("server")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer / chat template directory (default: --model, or the server's tokenizer_path)")
    s.add_argument("--api-key", default=None, help="Bearer key of the server")
    s.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    s.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    s.add_argument("--device", default=None, help="embedded engine device: cpu or cuda[:N] (default: cuda if any)")
    s.add_argument("--dtype", default="auto", help="embedded engine dtype (auto, bfloat16, float32, ...)")
    s.add_argument("--max-batch-size", type=int, default=32, help="embedded engine batch size (default 32)")
    o = p.add_argument_group("run")
    o.add_argument("--name", default=None, help="model label in the tables (default: the model dir or URL)")
    o.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark only")
    o.add_argument("--reward-workers", type=int, default=2, help="math-verify worker processes (default 2)")
    o.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per graded answer (default 10)")
    o.add_argument("--overwrite", action="store_true", help="discard records already in --out instead of resuming")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--log-level", default="warning")
    return p


def _tokenizer_for_url(url: str, api_key: str | None) -> str:
    """The server's ``tokenizer_path`` when it is a local directory (SGLang's /model_info)."""
    import asyncio

    from ..rollout.client import SGLangClient

    async def info() -> dict[str, Any]:
        async with SGLangClient(url, api_key=api_key, max_retries=1, timeout_s=30) as client:
            return await client.model_info()

    data = asyncio.run(info())
    path = data.get("tokenizer_path") or data.get("model_path")
    if path and Path(path).is_dir():
        return str(path)
    raise EvalError(f"{url} serves {path!r}, which is not a local directory; pass --tokenizer with the student's "
                    "tokenizer (its chat template formats the prompts)")


def main(argv: list[str]) -> int:
    """Run ``scope-megatron eval``; 0 on success, 1 when the server fails, 2 on bad input or settings."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the embedded engine spins otherwise on a busy CPU
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (BenchmarkFormatError, MetricError, EvalError) as exc:
        print(f"scope-megatron eval: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, EvalServerError) else 2


def _run(args: argparse.Namespace) -> int:
    from ..rollout.data import PAPER_FORMAT, REFERENCE_CODE_FORMAT

    ks = parse_ks(args.k) if args.k is not None else default_ks(args.n)
    settings = EvalSettings(n=args.n, ks=tuple(ks), estimator=args.estimator, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, max_new_tokens=args.max_new_tokens,
                            repetition_penalty=args.repetition_penalty, seed=args.seed,
                            bootstrap_draws=args.bootstrap_draws, bootstrap_seed=args.bootstrap_seed,
                            prompt_format=PAPER_FORMAT if args.prompt_format == "paper" else REFERENCE_CODE_FORMAT)
    benchmarks = load_benchmarks(args.benchmarks, limit=args.limit)  # malformed files fail before any sampling
    tokenizer_dir = args.tokenizer or args.model or _tokenizer_for_url(args.url, args.api_key)
    from transformers import AutoTokenizer

    from ..rollout.client import SGLangClient
    from ..rollout.rewards import MathRewardPool

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if getattr(tokenizer, "chat_template", None) is None and settings.prompt_format.use_chat_template:
        raise EvalError(f"the tokenizer in {tokenizer_dir} has no chat template; pass --tokenizer with the "
                        "student's tokenizer")
    name = args.name or args.model or args.url
    print(f"scope-megatron eval: {name} on {', '.join(f'{b.name} ({len(b)})' for b in benchmarks)}; n={settings.n}, "
          f"k={','.join(map(str, settings.ks))}; Pass@k estimator: {settings.estimator}", flush=True)
    handle = None
    try:
        pending = -1 if args.overwrite else pending_problems(benchmarks, args.out, settings.n)
        if args.model and pending == 0:
            print(f"every problem already has a record in {args.out}; recomputing the metrics without sampling",
                  flush=True)
            url = "http://127.0.0.1:1"  # never contacted: nothing is left to sample
        elif args.model:
            from ..rollout.embedded_server import start_embedded_server

            print(f"starting the embedded engine for {args.model} ...", flush=True)
            handle = start_embedded_server(args.model, device=args.device, dtype=args.dtype,
                                           max_batch_size=args.max_batch_size, random_seed=args.seed or 0,
                                           enable_deterministic_inference=args.seed is not None,  # seeds honoured
                                           ready_timeout=600.0)
            url = handle.url
        else:
            url = args.url
        client = SGLangClient(url, api_key=args.api_key, max_concurrency=args.concurrency,
                              timeout_s=args.request_timeout)
        with MathRewardPool(num_workers=args.reward_workers, timeout_s=args.reward_timeout) as pool:
            result = run_evaluation(client, benchmarks, tokenizer, settings, args.out, reward_pool=pool,
                                    model_name=name, overwrite=args.overwrite, progress=not args.no_progress)
    finally:
        if handle is not None:
            handle.stop()
    print()
    print(results_markdown(result))
    resumed = sum(b.num_resumed for b in result.benchmarks)
    if resumed:
        print(f"{resumed} problems were taken from earlier records in {args.out} (resumed run).")
    out = Path(args.out)
    print(f"Pass@k estimator: {settings.estimator} ({settings.estimator_description()})")
    print(f"results: {out / 'results.json'}, {out / 'results.md'}; per-problem records: {out / 'records'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
