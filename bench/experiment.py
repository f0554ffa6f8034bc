"""Small-scale check of the paper's claims on the demo's synthetic task.

Runs SCOPE, OPD (G=1 and G=8), GRPO and the SCOPE ablations from the same student (the demo's
cached, briefly SFT-ed student) against the same teacher (the demo's SFT teacher), several seeds
each, through ``scope_megatron.train`` (embedded engines, weight sync, math-verify rewards,
in-loop held-out evaluation), and prints a table of held-out Avg@1 before / after
(mean +- std over seeds) as markdown, also written with the raw numbers to ``OUT/results.{md,json}``.

    python bench/experiment.py                       # small default (CPU)
    python bench/experiment.py --steps 40 --seeds 0 1 2 --methods scope opd_g1 grpo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scope_megatron.examples import demo  # noqa: E402

# name -> (algorithm.preset, group size or None for the default G)
METHODS = {
    "scope": ("scope", None),
    "opd_g1": ("opd", 1),
    "opd_g8": ("opd", 8),
    "grpo": ("grpo", None),
    "scope_uniform": ("scope_uniform", None),
    "scope_no_student_weight": ("scope_no_student_weight", None),
    "scope_no_teacher_weight": ("scope_no_teacher_weight", None),
    "scope_opposite_student": ("scope_opposite_student", None),
    "scope_opposite_teacher": ("scope_opposite_teacher", None),
}


def summarize(rows: list[dict], methods: list[str]) -> tuple[str, dict]:
    out: dict[str, dict] = {}
    lines = ["| method | preset | G | seeds | held-out Avg@1 after (mean +- std) | min - max | gain over start | "
             "rollout acc, last 5 steps |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m and r.get("after") is not None]
        if not rs:
            lines.append(f"| {m} | | | 0 | failed | | | |")
            continue
        after = [r["after"] for r in rs]
        gain = [r["after"] - r["before"] for r in rs]
        acc = [r["rollout_acc_last5"] for r in rs]
        sd = statistics.stdev(after) if len(after) > 1 else 0.0
        out[m] = {"after_mean": statistics.mean(after), "after_std": sd, "after_min": min(after),
                  "after_max": max(after), "gain_mean": statistics.mean(gain), "seeds": len(rs),
                  "rollout_acc_last5_mean": statistics.mean(acc)}
        lines.append(f"| {m} | {rs[0]['preset']} | {rs[0]['group_size']} | {len(rs)} | "
                     f"{statistics.mean(after):.1%} +- {sd:.1%} | {min(after):.1%} - {max(after):.1%} | "
                     f"{statistics.mean(gain):+.1%} | {statistics.mean(acc):.1%} |")
    return "\n".join(lines) + "\n", out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/experiment")
    parser.add_argument("--cache", default="runs/demo-cache", help="the demo's cache (teacher, student, task)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    parser.add_argument("--group", type=int, default=4, help="rollouts per prompt (G) where the method does not fix it")
    parser.add_argument("--eval-problems", type=int, default=64)
    parser.add_argument("--eval-n", type=int, default=4)
    args = parser.parse_args(argv)

    s = demo.DemoSettings()
    s.scope_steps, s.scope_prompts, s.scope_group = args.steps, args.prompts, args.group
    s.eval_problems, s.eval_n, s.eval_every = args.eval_problems, args.eval_n, args.steps
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() / "default"
    task = demo.write_task(cache / "task", seed=s.seed, num_test=max(s.eval_problems, 8))
    print("teacher / student (the demo's, cached):", flush=True)
    teacher = demo.train_sft_model("teacher", cache, task["train"], s)
    student = demo.train_sft_model("student", cache, task["train"], s)
    teacher_avg = demo.evaluate_model(teacher, task["test"], cache / "teacher_eval" / s.cache_key("teacher"), s)
    print(f"teacher held-out Avg@1 {teacher_avg:.1%}", flush=True)

    rows: list[dict] = []
    results_json = out / "results.json"
    start = time.monotonic()
    for method in args.methods:
        preset, group = METHODS[method]
        for seed in args.seeds:
            run = out / f"{method}-seed{seed}"
            row = {"method": method, "preset": preset, "group_size": group or s.scope_group, "seed": seed,
                   "run_dir": str(run)}
            metrics = demo.read_metrics(run)
            if not any("eval/mean/avg@1" in m and m["step"] == args.steps for m in metrics):
                config = demo.scope_config(student, teacher, task["train"], task["test"], run, s, preset=preset,
                                           group_size=group, seed=seed)
                print(f"[{time.monotonic() - start:5.0f} s] {method} seed {seed}", flush=True)
                try:
                    run.mkdir(parents=True, exist_ok=True)
                    (run / "metrics.jsonl").unlink(missing_ok=True)
                    demo.run_training(config, run / "config_in.yaml", method, args.steps, run / "train.log",
                                      every=args.steps)
                except RuntimeError as exc:
                    print(f"  failed: {exc}", flush=True)
                    row["error"] = str(exc)[:2000]
                    rows.append(row)
                    continue
                metrics = demo.read_metrics(run)
            held, rollout = demo.accuracy_curves(metrics)
            row.update(before=held[0][1], after=held[-1][1], curve=held,
                       rollout_acc_last5=statistics.mean(a for _, a in rollout[-5:]))
            rows.append(row)
            table, summary = summarize(rows, args.methods)
            results_json.write_text(json.dumps({"settings": vars(args), "teacher_avg@1": teacher_avg,
                                                "runs": rows, "summary": summary}, indent=2) + "\n")
    table, summary = summarize(rows, args.methods)
    header = (f"Held-out Avg@1 ({s.eval_problems} two-digit additions, n={s.eval_n}) after {args.steps} steps of "
              f"B={args.prompts} prompts, seeds {args.seeds}; start (student) "
              f"{statistics.mean(r['before'] for r in rows if 'before' in r):.1%}, teacher {teacher_avg:.1%}.\n\n")
    (out / "results.md").write_text(header + table)
    results_json.write_text(json.dumps({"settings": vars(args), "teacher_avg@1": teacher_avg, "runs": rows,
                                        "summary": summary}, indent=2) + "\n")
    print()
    print(header + table)
    print(f"{out / 'results.md'}, {results_json} ({(time.monotonic() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
