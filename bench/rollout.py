"""Embedded-engine throughput on CPU and the SGLang client's per-request overhead; prints JSON.

- throughput: one /generate call with a batch of 8 prompts x 64 new tokens (ignore_eos) on the
  tiny qwen3 model, timed over a few repeats after a warm-up; tokens/s = 8*64 / wall time;
- client overhead: per-request wall time of SGLangClient.generate (parsing and checks included)
  minus that of a bare httpx POST of the same body, both against the embedded engine, for a
  1-token request, sequentially.

Usage: python bench/rollout.py [--repeats 3] [--requests 50]
"""

from __future__ import annotations

import os

# OpenMP worker threads that spin between the engine's small ops starve the other threads of a
# small CPU box (measured here: 8x64 tokens took 2-7 s with spinning, 0.35 s without). Passive
# waiting must be chosen before torch loads; set OMP_WAIT_POLICY=ACTIVE to measure the default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import json
import statistics
import tempfile
import time

import httpx
import torch

from scope_megatron.rollout.client import SGLangClient
from scope_megatron.rollout.embedded_server import start_embedded_server
from scope_megatron.rollout.protocol import SamplingParams
from scope_megatron.examples.tiny_models import save_tiny_hf_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_hf_model(tmp, family="qwen3", seed=0)
        with start_embedded_server(model_dir, max_batch_size=args.batch) as server:
            prompts = [[1] + [20 + (i * 7 + j) % 60 for j in range(16)] for i in range(args.batch)]
            params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.6, top_p=0.95, top_k=20,
                                    ignore_eos=True, sampling_seed=0)
            body = {"input_ids": prompts, "sampling_params": params.to_json(), "return_logprob": True}
            httpx.post(server.url + "/generate", json=body, timeout=300).raise_for_status()  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r = httpx.post(server.url + "/generate", json=body, timeout=300)
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
                assert sum(len(x["output_ids"]) for x in r.json()) == args.batch * args.new_tokens
            best = min(times)

            one = SamplingParams(max_new_tokens=1, temperature=1.0, sampling_seed=0)
            one_body = {"input_ids": prompts[0], "sampling_params": one.to_json(), "return_logprob": True}

            async def overhead() -> tuple[float, float]:
                async with httpx.AsyncClient(base_url=server.url) as http, SGLangClient(server.url) as client:
                    raw, wrapped = [], []
                    for _ in range(5):
                        await http.post("/generate", json=one_body)
                        await client.generate(prompts[0], one)
                    for _ in range(args.requests):
                        t0 = time.perf_counter()
                        (await http.post("/generate", json=one_body)).json()
                        raw.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        await client.generate(prompts[0], one)
                        wrapped.append(time.perf_counter() - t0)
                    return statistics.median(raw), statistics.median(wrapped)

            raw_s, client_s = asyncio.run(overhead())
    print(json.dumps({
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "model": "tiny qwen3 (2 layers, hidden 64)",
        "batch": args.batch, "new_tokens": args.new_tokens, "prompt_tokens": len(prompts[0]),
        "generate_wall_s_best": round(best, 4), "generate_wall_s_all": [round(t, 4) for t in times],
        "tokens_per_s": round(args.batch * args.new_tokens / best, 1),
        "request_median_ms_raw_httpx": round(raw_s * 1e3, 3),
        "request_median_ms_sglang_client": round(client_s * 1e3, 3),
        "client_overhead_ms_per_request": round((client_s - raw_s) * 1e3, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
