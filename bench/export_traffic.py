"""Bytes each rank sends and receives during one weight export, old path vs new, at TP x PP x DP.

* ``old``: :func:`scope_megatron.model.hf_io.export_hf_tensors` on every rank (a TP all-gather per
  parameter on every replica, and a broadcast of every parameter to every pipeline stage);
* ``new``: :func:`scope_megatron.model.hf_io.export_hf_tensors_to_rank0` (the first
  data-parallel replica only; every TP rank of every stage sends its own shards to rank 0).

Both run in one set of gloo processes on a tiny model (qwen3 family; ``--hidden``, ``--layers``,
``--ffn`` scale it), after which rank 0 checks that the two streams are bit-identical. Bytes
are counted by wrapping the ``torch.distributed`` calls during each export, as the minimum a
collective must move whatever its algorithm: ``all_gather`` over n ranks sends and receives
(n-1) x the tensor per rank; ``broadcast`` sends (n-1) x from the source (gloo forwards along a
chain, which spreads the sending but not the total) and receives 1 x elsewhere; ``send`` /
``recv`` count their tensor. Prints one JSON object.

    python bench/export_traffic.py                 # TP2 x PP2 x DP2 on 8 ranks
    python bench/export_traffic.py --tp 2 --pp 2 --dp 1 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class TrafficCounter:
    """Wraps torch.distributed's point-to-point and collective calls, counting bytes per call kind."""

    NAMES = ("all_gather", "broadcast", "send", "isend", "recv", "irecv", "gather", "all_reduce")

    def __init__(self):
        self.sent = defaultdict(int)
        self.received = defaultdict(int)
        self.calls = defaultdict(int)
        self._real: dict[str, Any] = {}

    def __enter__(self) -> "TrafficCounter":
        import torch.distributed as dist

        for name in self.NAMES:
            self._real[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._real[name]))
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        for name, fn in self._real.items():
            setattr(dist, name, fn)

    def _wrap(self, name: str, real: Any):
        import torch.distributed as dist

        def nbytes(t) -> int:
            return t.numel() * t.element_size()

        def call(*args, **kwargs):
            group = kwargs.get("group")
            n = dist.get_world_size(group) if group is not None else dist.get_world_size()
            me = dist.get_rank()
            self.calls[name] += 1
            if name == "all_gather":
                size = nbytes(args[1] if len(args) > 1 else kwargs["tensor"])
                self.sent[name] += (n - 1) * size
                self.received[name] += (n - 1) * size
            elif name == "broadcast":
                size = nbytes(args[0] if args else kwargs["tensor"])
                src = kwargs.get("src", args[1] if len(args) > 1 else None)
                if me == src:
                    self.sent[name] += (n - 1) * size
                else:
                    self.received[name] += size
            elif name in ("send", "isend"):
                self.sent[name] += nbytes(args[0] if args else kwargs["tensor"])
            elif name in ("recv", "irecv"):
                self.received[name] += nbytes(args[0] if args else kwargs["tensor"])
            elif name == "gather":
                size = nbytes(args[0] if args else kwargs["tensor"])
                dst = kwargs.get("dst", args[2] if len(args) > 2 else 0)
                if me == dst:
                    self.received[name] += (n - 1) * size
                else:
                    self.sent[name] += size
            elif name == "all_reduce":
                size = nbytes(args[0] if args else kwargs["tensor"])
                self.sent[name] += 2 * (n - 1) * size // n  # ring all-reduce
                self.received[name] += 2 * (n - 1) * size // n
            return real(*args, **kwargs)

        return call

    def summary(self) -> dict[str, Any]:
        return {"sent_bytes": sum(self.sent.values()), "received_bytes": sum(self.received.values()),
                "calls": dict(self.calls)}


def _rank_main(rank: int, world: int, port: int, cfg: dict[str, Any], hf_dir: str, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    try:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from scope_megatron.model import hf_io
        from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
        from scope_megatron.model.builder import build_gpt_model
        from scope_megatron.parallel import init_parallel

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        init_parallel(cfg["tp"], cfg["pp"])
        arch = arch_from_hf_config(load_hf_config(hf_dir))
        model = build_gpt_model(arch, params_dtype=torch.float32, perform_initialization=False)
        hf_io.load_hf_into_model(model, arch, hf_io.HFWeightReader(hf_dir, arch))
        out: dict[str, Any] = {"rank": rank, "tp_rank": ps.get_tensor_model_parallel_rank(),
                               "pp_rank": ps.get_pipeline_model_parallel_rank(),
                               "dp_rank": ps.get_data_parallel_rank()}
        streams = {}
        for path, export in (("old", hf_io.export_hf_tensors), ("new", hf_io.export_hf_tensors_to_rank0)):
            dist.barrier()
            t0 = time.perf_counter()
            with TrafficCounter() as counter:
                stream = [(name, tensor.clone()) for name, tensor in export(model, arch)]
            out[path] = {**counter.summary(), "seconds": time.perf_counter() - t0, "tensors_yielded": len(stream)}
            streams[path] = stream
        if rank == 0:
            old, new = streams["old"], streams["new"]
            out["streams_identical"] = [n for n, _ in old] == [n for n, _ in new] and all(
                a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(old, new))
            out["model_bytes"] = sum(t.numel() * t.element_size() for _, t in new)
        dist.barrier()
        results.put((rank, "ok", out))
        dist.destroy_process_group()
    except BaseException:
        import traceback

        results.put((rank, "error", traceback.format_exc()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    from scope_megatron.examples.tiny_models import save_tiny_hf_model
    from scope_megatron.parallel import free_port

    world = args.tp * args.pp * args.dp
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(save_tiny_hf_model(Path(tmp) / "hf", family="qwen3", seed=0, with_tokenizer=False,
                                        hidden_size=args.hidden, intermediate_size=args.ffn,
                                        num_hidden_layers=args.layers))
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, vars(args), hf_dir, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        per_rank: dict[int, dict] = {}
        deadline = time.monotonic() + args.timeout
        try:
            while len(per_rank) < world:
                rank, status, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
                if status != "ok":
                    raise RuntimeError(f"rank {rank}:\n{payload}")
                per_rank[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    ranks = [per_rank[r] for r in range(world)]
    report: dict[str, Any] = {"layout": {"tp": args.tp, "pp": args.pp, "dp": args.dp, "world": world},
                              "model": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers,
                                        "bytes": ranks[0]["model_bytes"]},
                              "streams_identical": ranks[0]["streams_identical"]}
    for path in ("old", "new"):
        report[path] = {
            "total_sent_bytes": sum(r[path]["sent_bytes"] for r in ranks),
            "total_received_bytes": sum(r[path]["received_bytes"] for r in ranks),
            "rank0_received_bytes": ranks[0][path]["received_bytes"],
            "max_seconds": max(r[path]["seconds"] for r in ranks),
            "per_rank": {str(r["rank"]): {"coords": {"tp": r["tp_rank"], "pp": r["pp_rank"], "dp": r["dp_rank"]},
                                          "sent": r[path]["sent_bytes"], "received": r[path]["received_bytes"],
                                          "calls": r[path]["calls"]} for r in ranks}}
    report["total_bytes_old_over_new"] = report["old"]["total_sent_bytes"] / max(report["new"]["total_sent_bytes"], 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
