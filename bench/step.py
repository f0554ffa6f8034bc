"""Per-phase times of a few SCOPE steps on a small configuration, printed as JSON.

    python bench/step.py                          # CPU, tiny models, 1 rank, 5 steps
    python bench/step.py --nproc 2 --tp 2         # torchrun, TP=2
    python bench/step.py --hidden 1024 --layers 8 --new-tokens 256 --prompts 8 --group 8   # bigger (GPU)

Builds random tiny HF models (student and teacher of the same family and size) and toy prompts,
runs ``scope_megatron.train`` as a user would (embedded engines; on GPU they use the GPU), reads
``metrics.jsonl`` and reports the mean of each phase over the steps after the first (warm-up),
plus the first step separately. Extra ``key=value`` arguments go to the trainer.
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
          "time/old_logprobs", "time/train", "time/sync", "time/checkpoint", "time/step")
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
    run_dir = work / f"run-{int(time.time())}"
    cmd = [sys.executable, "-m", "scope_megatron.train"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "scope_megatron.train"]
    cmd += ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), f"run_dir={run_dir}", f"steps={args.steps}",
            f"model.student={work / 'student'}", f"teacher.model={work / 'teacher'}", f"data.paths=[{prompts}]",
            f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", f"rollout.prompts_per_step={args.prompts}",
            f"rollout.group_size={args.group}", f"rollout.max_new_tokens={args.new_tokens}",
            f"checkpoint.every={args.checkpoint_every}", "checkpoint.save_at_end=false", "logging.tqdm=false",
            f"parallel.micro_batch_size={max(1, args.prompts * args.group // 2)}", *args.overrides]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        print(proc.stderr[-5000:], file=sys.stderr)
        return proc.returncode
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    warm = rows[1:] or rows

    def mean(key: str, data: list[dict]) -> float | None:
        values = [r[key] for r in data if isinstance(r.get(key), (int, float))]
        return round(statistics.mean(values), 5) if values else None

    import torch

    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "config": {"nproc": args.nproc, "tp": args.tp, "pp": args.pp, "prompts": args.prompts, "group": args.group,
                   "max_new_tokens": args.new_tokens, "hidden": args.hidden or 64, "layers": args.layers or 2,
                   "steps": args.steps},
        "steps_averaged": len(warm),
        "phases_mean_s": {k: mean(k, warm) for k in PHASES},
        "first_step_s": {k: rows[0].get(k) for k in PHASES},
        "other_mean": {k: mean(k, warm) for k in OTHER},
        "process_wall_s": round(wall, 2),
        "run_dir": str(run_dir),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
