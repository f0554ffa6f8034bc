"""Run a function on N gloo ranks in fresh processes, with a timeout so a hang fails fast.

Usage in a test::

    results = run_ranks(_worker, world_size=2, args=(path,), timeout=120)

``_worker(rank, world_size, *args)`` must be a module-level function (processes are spawned).
It runs after ``torch.distributed`` is initialised with gloo; its return value (picklable)
comes back in ``results[rank]``. An exception on any rank fails the call with that rank's
traceback; a rank still running after ``timeout`` seconds is killed and the call fails.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from typing import Any, Callable, Sequence

from scope_megatron.parallel import free_port  # noqa: F401  (tests import it from here too)


def _entry(fn: Callable, rank: int, world_size: int, port: int, args: Sequence[Any], results: mp.Queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    try:
        import torch

        torch.set_num_threads(1)
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # plain pickle: tensors travel as bytes, not as shared-memory handles that die with this process
        results.put((rank, "ok", pickle.dumps(out)))
        dist.destroy_process_group()
    except BaseException:  # report every failure, including SystemExit from argparse
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{fn.__name__}: ranks {sorted(set(range(world_size)) - set(out))} "
                                   f"did not finish within {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RuntimeError(f"{fn.__name__}: rank(s) {dead} died (exit codes "
                                       f"{[procs[r].exitcode for r in dead]})")
                continue
            if status == "ok":
                out[rank] = pickle.loads(payload)
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # one failure is enough; the others may hang waiting for it
        if errors:
            raise RuntimeError(f"{fn.__name__} failed:\n" + "\n".join(errors))
    finally:
        for p in procs:
            p.join(timeout=5 if not errors and len(out) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
