"""Per-phase times of a few SCOPE steps on a small configuration, printed as JSON.

    python bench/step.py                          # CPU, tiny models, 1 rank, 5 steps
    python bench/step.py --nproc 2 --tp 2         # torchrun, TP=2
    python bench/step.py --hidden 1024 --layers 8 --new-tokens 256 --prompts 8 --group 8   # bigger (GPU)
    python bench/step.py --max-staleness 0 1 --threads 1   # serial vs overlapped rollouts, one run each
    python bench/step.py --max-staleness 0 1 --threads 1 --steps 10 --hidden 256 --layers 4 \
        --new-tokens 64 --prompts 4 --group 4              # the same with generation ~ training (docs/training.md)

Builds random tiny HF models (student and teacher of the same family and size) and toy prompts,
runs ``scope_megatron.train`` as a user would (embedded engines; on GPU they use the GPU), reads
``metrics.jsonl`` and reports the mean of each phase over the steady-state steps (after the
first, the warm-up, and before the last, which runs ahead of nothing), plus the first step
separately. Extra ``key=value`` arguments go to the trainer.

With several ``--max-staleness`` values the runs go one after the other on the same models and
prompts and ``comparison`` gives each one's mean step time over the first's, and the idle
fractions of both sides: the trainer's (waiting for rollouts) and the engines' (no batch to
generate). ``--threads 1`` limits the trainer and each engine to one thread, so on two cores the
two sides do not compete for one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("time/generate", "time/teacher_total", "time/teacher_tail", "time/reward_tail", "time/rollout",
          "time/old_logprobs", "time/train", "time/rollout_wait", "time/sync", "time/checkpoint", "time/step",
          "overlap/trainer_wait_s", "overlap/generation_s", "overlap/training_s", "overlap/concurrent_s")
OTHER = ("sync/bytes", "sync/transfer_seconds", "perf/tokens_per_s", "perf/rollout_tokens_per_s", "perf/mfu",
         "perf/train_mfu", "response/length_mean", "train/loss_tokens")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--family", default="qwen3")
    p.add_argument("--hidden", type=int, default=None, help="model width (default: the tiny 64)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--max-staleness", type=int, nargs="+", default=[0],
                   help="rollout.max_staleness values to run one after the other (e.g. 0 1)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the trainer and of each engine")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from scope_megatron.examples.tiny_models import save_tiny_hf_model
    from scope_megatron.examples.tiny import write_prompts

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="scope-bench-"))
    size = {}
    if args.hidden:
        heads = max(4, args.hidden // 64)
        size = dict(hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_attention_heads=heads,
                    num_key_value_heads=max(1, heads // 4), head_dim=64)
    if args.layers:
        size["num_hidden_layers"] = args.layers
    if args.family != "qwen3":
        size.pop("head_dim", None)
    for role, seed in (("student", 0), ("teacher", 1)):
        if not (work / role / "config.json").is_file():
            save_tiny_hf_model(work / role, args.family, seed=seed, **size)
    prompts = write_prompts(work / "prompts.jsonl")
    results = [run_once(args, work, prompts, staleness) for staleness in args.max_staleness]
    if any(r is None for r in results):
        return 1
    if len(results) == 1:
        print(json.dumps(results[0], indent=1))
        return 0
    base = results[0]["phases_mean_s"]["time/step"]
    comparison = {f"max_staleness={r['config']['max_staleness']}": {
        "step_time_s": r["phases_mean_s"]["time/step"],
        "step_time_ratio": round(r["phases_mean_s"]["time/step"] / base, 4),
        **r["idle_fractions"]} for r in results}
    print(json.dumps({"runs": results, "comparison": comparison}, indent=1))
    return 0


def _idle_fractions(rows: list[dict]) -> dict[str, float]:
    """Mean share of the step each side waits: trainer for rollouts, engines for a batch."""
    trainer, engines, overlap = [], [], []
    for r in rows:
        step = r["time/step"]
        if "overlap/trainer_wait_s" in r:  # asynchronous
            trainer.append((r["overlap/trainer_wait_s"] + r.get("time/rollout_wait", 0.0)) / step)
            if "overlap/engine_idle_s" in r:
                engines.append(r["overlap/engine_idle_s"] / step)
                overlap.append(r["overlap/fraction"])
        else:  # serial: the trainer waits for the whole rollout, the engines for the rest
            trainer.append(r["time/rollout"] / step)
            engines.append(max(0.0, step - r["time/rollout"]) / step)
    out = {"trainer_idle_fraction": round(statistics.mean(trainer), 4) if trainer else None,
           "engine_idle_fraction": round(statistics.mean(engines), 4) if engines else None}
    if overlap:
        out["overlap_fraction"] = round(statistics.mean(overlap), 4)
    return out


def run_once(args: argparse.Namespace, work: Path, prompts: Path, max_staleness: int) -> dict | None:
    """One trainer run; its phase means (steps after the first) as a dict, None if it failed."""
    run_dir = work / f"run-{int(time.time())}-s{max_staleness}"
    cmd = [sys.executable, "-m", "scope_megatron.train"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "scope_megatron.train"]
    cmd += ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"run_dir={run_dir}", f"steps={args.steps}",
            f"model.student={work / 'student'}", f"teacher.model={work / 'teacher'}", f"data.paths=[{prompts}]",
            f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"rollout.prompts_per_step={args.prompts}",
            f"rollout.group_size={args.group}", f"rollout.max_new_tokens={args.new_tokens}",
            f"checkpoint.every={args.checkpoint_every}", "checkpoint.save_at_end=false", "logging.tqdm=false",
            f"parallel.micro_batch_size={max(1, args.prompts * args.group // 2)}",
            f"rollout.max_staleness={max_staleness}", *args.overrides]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    if args.threads:  # the engines inherit it: one thread per side
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        print(proc.stderr[-5000:], file=sys.stderr)
        return None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # steady state: not the first step (warm-up) nor, with 4+ steps, the last (which in
    # asynchronous mode has no next batch to generate)
    warm = rows[1:-1] if len(rows) >= 4 else (rows[1:] or rows)

    def mean(key: str, data: list[dict]) -> float | None:
        values = [r[key] for r in data if isinstance(r.get(key), (int, float))]
        return round(statistics.mean(values), 5) if values else None

    import torch

    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "config": {"nproc": args.nproc, "tp": args.tp, "pp": args.pp, "prompts": args.prompts, "group": args.group,
                   "max_new_tokens": args.new_tokens, "hidden": args.hidden or 64, "layers": args.layers or 2,
                   "steps": args.steps, "max_staleness": max_staleness, "threads": args.threads},
        "steps_averaged": len(warm),
        "phases_mean_s": {k: mean(k, warm) for k in PHASES},
        "idle_fractions": _idle_fractions(warm),
        "first_step_s": {k: rows[0].get(k) for k in PHASES},
        "other_mean": {k: mean(k, warm) for k in OTHER},
        "process_wall_s": round(wall, 2),
        "run_dir": str(run_dir),
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
