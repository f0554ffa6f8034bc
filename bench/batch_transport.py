"""Broadcast of one step's rollout batch over gloo: pickled objects vs flat tensors vs a raw copy.

Three paths, each in a fresh pair (or ``--ranks``) of gloo processes, on one batch:

* ``raw``: one uint8 tensor of the new path's byte count, ``dist.broadcast`` (the floor);
* ``new``: :func:`scope_megatron.rollout.batch_transport.broadcast_rollout_batch`;
* ``old``: ``dist.broadcast_object_list([("ok", batch)])``, what the loop does without it.

The batch: ``--trajectories`` (256 prompts x 8 samples) of a ``--prompt-tokens`` prompt and a
response of uniformly random length in [R/2, R] (R = ``--response-tokens``), two float32
log-prob lists per response token, and with ``--topk K`` the teacher's top-K ids and log-probs
per response token; ``--scale`` multiplies the number of trajectories. Rank 0 holds it as the
controller builds it (plain Python lists, ``--input lists``) or as numpy arrays.

Per path, per rank: wall time from a common barrier to the rebuilt batch, and the resident
set's high-water mark above its level just before (Linux ``/proc/self/clear_refs``, ``VmHWM``).
With ``--consume`` each receiver then builds one DP rank's packed micro-batches (``--dp``) from
what it received (time and peak again). Prints one JSON object.

    python bench/batch_transport.py                       # paper size, no top-k
    python bench/batch_transport.py --topk 20 --scale 0.05 --paths raw new old
    python bench/batch_transport.py --topk 20 --paths raw new --input arrays
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
        f.write("5")


def make_batch(cfg: dict[str, Any]):
    """The bench batch; the same on every call with the same cfg."""
    import numpy as np

    from scope_megatron.rollout.types import RolloutBatch, Trajectory

    rng = np.random.default_rng(0)
    n, r_max, p, k = cfg["trajectories"], cfg["response_tokens"], cfg["prompt_tokens"], cfg["topk"]
    arrays = cfg["input"] == "arrays"
    conv = (lambda a: a) if arrays else (lambda a: a.tolist())
    trajectories = []
    for i in range(n):
        r = int(rng.integers(r_max // 2, r_max + 1))
        trajectories.append(Trajectory(
            group=i // 8, prompt_index=i // 8, sample=i % 8,
            prompt_ids=conv(rng.integers(0, 150_000, p, dtype=np.int32)),
            response_ids=conv(rng.integers(0, 150_000, r, dtype=np.int32)),
            rollout_logprobs=conv(-8 * rng.random(r, dtype=np.float32)),
            teacher_logprobs=conv(-8 * rng.random(r, dtype=np.float32)),
            reward=float(i % 2), reward_status="correct" if i % 2 else "wrong", finish="stop",
            weight_version="12",
            teacher_topk_ids=conv(rng.integers(0, 150_000, (r, k), dtype=np.int32)) if k else [],
            teacher_topk_logprobs=conv(-8 * rng.random((r, k), dtype=np.float32)) if k else []))
    return RolloutBatch(step=12, trajectories=trajectories, timings={"time/generate": 1.0})


def _rank_main(rank: int, world: int, port: int, path: str, cfg: dict[str, Any], results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    try:
        import torch
        import torch.distributed as dist

        from scope_megatron.rollout.batch_transport import broadcast_rollout_batch, rollout_batch_nbytes

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.new_group(backend="gloo")
        out: dict[str, Any] = {"rank": rank}
        batch = raw = None
        if rank == 0:
            t0 = time.perf_counter()
            batch = make_batch(cfg)
            out["build_s"] = time.perf_counter() - t0
            out["tensor_bytes"] = rollout_batch_nbytes(batch)
            if path == "raw":
                raw = torch.ones(out["tensor_bytes"], dtype=torch.uint8)
                batch = None
        sizes = [out.get("tensor_bytes", 0)]
        dist.broadcast_object_list(sizes, src=0, group=group)
        gc.collect()
        before = _status_kib("VmRSS")
        _reset_peak()
        dist.barrier(group=group)
        t0 = time.perf_counter()
        received = None
        if path == "raw":
            if rank != 0:
                raw = torch.empty(sizes[0], dtype=torch.uint8)
            flat, piece = raw.view(-1), 1 << 30
            for start in range(0, flat.numel(), piece):
                dist.broadcast(flat[start:start + piece], src=0, group=group)
        elif path == "new":
            received = broadcast_rollout_batch(batch, src=0, group=group)
        else:
            box = [("ok", batch)]
            dist.broadcast_object_list(box, src=0, group=group)
            received = box[0][1]
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_above_start_bytes"] = (_status_kib("VmHWM") - before) * 1024
        if received is not None:
            out["response_tokens"] = sum(len(t.response_ids) for t in received.trajectories)
        if cfg["consume"] and received is not None and rank != 0:
            from scope_megatron.trainer.batching import build_step_data

            gc.collect()
            before = _status_kib("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            data = build_step_data(received.trajectories, dp=cfg["dp"], dp_rank=0, micro_batch_size=1, pad_id=0,
                                   max_tokens_per_microbatch=2 * (cfg["response_tokens"] + cfg["prompt_tokens"]),
                                   teacher_topk=cfg["topk"])
            out["consume_seconds"] = time.perf_counter() - t0
            out["consume_peak_rss_above_start_bytes"] = (_status_kib("VmHWM") - before) * 1024
            out["consume_micro_batches"] = len(data.micro_batches)
        dist.barrier(group=group)
        results.put((rank, "ok", out))
        dist.destroy_process_group()
    except BaseException:
        import traceback

        results.put((rank, "error", traceback.format_exc()))


def run_path(path: str, cfg: dict[str, Any], world: int, timeout: float) -> list[dict[str, Any]]:
    from scope_megatron.parallel import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, path, cfg, results)) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            rank, status, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
            if status != "ok":
                raise RuntimeError(f"path {path}, rank {rank}:\n{payload}")
            out[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trajectories", type=int, default=256 * 8)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies --trajectories")
    ap.add_argument("--response-tokens", type=int, default=12288, help="R: response lengths uniform in [R/2, R]")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--topk", type=int, default=0)
    ap.add_argument("--input", choices=["lists", "arrays"], default="lists",
                    help="how rank 0 holds the batch's fields: Python lists (the controller today) or numpy arrays")
    ap.add_argument("--paths", nargs="+", choices=["raw", "new", "old"], default=["raw", "new", "old"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--consume", action="store_true", help="receivers also build one DP rank's micro-batches")
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()
    cfg = {"trajectories": max(1, round(args.trajectories * args.scale)), "response_tokens": args.response_tokens,
           "prompt_tokens": args.prompt_tokens, "topk": args.topk, "input": args.input, "consume": args.consume,
           "dp": args.dp}
    report: dict[str, Any] = {"config": {**cfg, "ranks": args.ranks}, "paths": {}}
    for path in args.paths:
        ranks = run_path(path, cfg, args.ranks, args.timeout)
        report["tensor_bytes"] = ranks[0]["tensor_bytes"]
        report["paths"][path] = {
            "seconds": max(r["seconds"] for r in ranks),
            "peak_rss_above_start_bytes": {str(r["rank"]): r["peak_rss_above_start_bytes"] for r in ranks},
            "per_rank": ranks}
        print(f"{path}: {report['paths'][path]['seconds']:.2f} s", file=sys.stderr, flush=True)
    paths, raw_bytes = report["paths"], report["tensor_bytes"]
    if "raw" in paths and "new" in paths:
        receivers = [r for r in paths["new"]["per_rank"] if r["rank"] != 0]
        report["new_over_raw_seconds"] = paths["new"]["seconds"] / paths["raw"]["seconds"]
        report["new_receiver_peak_over_raw_bytes"] = max(r["peak_rss_above_start_bytes"] for r in receivers) / raw_bytes
        report["new_sender_peak_over_raw_bytes"] = paths["new"]["per_rank"][0]["peak_rss_above_start_bytes"] / raw_bytes
    if "old" in paths and "new" in paths:
        report["old_over_new_seconds"] = paths["old"]["seconds"] / paths["new"]["seconds"]
        old_recv = max(r["peak_rss_above_start_bytes"] for r in paths["old"]["per_rank"] if r["rank"] != 0)
        report["old_receiver_peak_over_raw_bytes"] = old_recv / raw_bytes
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
