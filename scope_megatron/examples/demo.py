"""The SCOPE demo (``scope-megatron demo``): a teacher, a student and SCOPE on a CPU in minutes.

1. a synthetic, verifiable math task: two-digit addition (``"47+38=?"``), the answer in
   ``\\boxed{}``, a short digit-by-digit solution (``"7+8=15, 4+3+1=8, \\boxed{85}"``), prompts
   through the tiny tokenizer's chat template with the paper's suffix; a held-out benchmark;
2. a small Qwen3-architecture TEACHER trained by SFT through the training loop
   (``algorithm.preset: sft``, the same Megatron path), cached under ``--cache`` so later runs skip it;
3. a smaller, briefly SFT-ed STUDENT (cached too);
4. SCOPE with embedded student / teacher engines, real weight sync and math-verify rewards
   (``scope_megatron.train``), 60 steps, evaluated on 512 held-out problems x 4 samples before,
   during and after (``scope_megatron.evaluation``, Avg@k with its standard error over problems);
5. a table (student before, student after SCOPE, teacher, with 95% intervals), TensorBoard logs,
   ``accuracy.png`` (accuracy against step, error bars) and ``summary.json`` in the run directory.

The KL path adds the reverse KL to the teacher over the whole 99-token vocabulary
(``algorithm.topk_kl: reverse`` with ``topk_k`` = the vocabulary size) to the paper's
sampled-token estimator, and the student's log-probs are taken at
temperature 1 like the teacher's (``scale_logits_by_rollout_temperature: false``): at this
scale the sampled-token estimator alone moves the student slowly and noisily, and a student at
the rollout temperature 0.6 against a teacher at 1 (SGLang scores prompts at 1 only) pushes down
nearly every sampled token. ``--no-topk`` and ``--scale-logits-by-rollout-temperature`` run the
paper's settings instead (docs/training.md, "Temperature handling").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from .tiny_models import tiny_vocab_size

# ------------------------------------------------------------------------------------------ the task


def solution_text(a: int, b: int) -> str:
    """Digit-by-digit addition, ones first, then the boxed answer: ``7+8=15, 4+3+1=8, \\boxed{85}``."""
    a1, a0, b1, b0 = a // 10, a % 10, b // 10, b % 10
    ones = a0 + b0
    carry = ones // 10
    return f"{a0}+{b0}={ones}, {a1}+{b1}+{carry}={a1 + b1 + carry}, \\boxed{{{a + b}}}"


def addition_problems(seed: int = 0, num_test: int = 64) -> tuple[list[dict], list[dict]]:
    """All two-digit pairs, shuffled; the first ``num_test`` are held out (benchmark), the rest train.
    Train records carry ``solution`` (for SFT); every record has ``problem`` and ``answer``."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    test = [{"id": f"test-{i}", "problem": f"{a}+{b}=?", "answer": str(a + b)} for i, (a, b) in enumerate(pairs[:num_test])]
    train = [{"id": f"train-{i}", "problem": f"{a}+{b}=?", "answer": str(a + b), "solution": solution_text(a, b)}
             for i, (a, b) in enumerate(pairs[num_test:])]
    return train, test


def write_task(directory: str | Path, seed: int = 0, num_test: int = 64) -> dict[str, Path]:
    """``train.jsonl`` (problem, answer, solution) and ``test.jsonl`` (problem, answer) under ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    train, test = addition_problems(seed, num_test)
    paths = {"train": d / "train.jsonl", "test": d / "test.jsonl"}
    for name, rows in (("train", train), ("test", test)):
        tmp = paths[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(paths[name])
    return paths


# ------------------------------------------------------------------------------------------ settings
@dataclass
class DemoSettings:
    """Sizes, steps and the SCOPE settings; the defaults take about 3 minutes on a 2-core CPU with
    the teacher and student cached, about 6 the first time.

    ``model_seed`` fixes the task split, the teacher and the student (cached); ``seed`` is the SCOPE
    run's (data order, rollout sampling), so runs with different ``seed`` start from the same student
    and are scored on the same held-out problems."""

    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_ffn: int = 384
    teacher_sft_steps: int = 400
    teacher_lr: float = 3e-3
    student_hidden: int = 96
    student_layers: int = 3
    student_ffn: int = 288
    student_sft_steps: int = 150
    student_lr: float = 3e-3
    sft_batch: int = 32
    held_out_problems: int = 512          # the task's held-out split (never trained on)
    scope_steps: int = 60
    scope_prompts: int = 16
    scope_group: int = 4
    scope_lr: float = 5e-4
    scope_temperature: float = 0.6
    # the KL path: the paper's sampled-token estimator, plus the top-k KL to the teacher when set
    scope_topk_kl: Optional[str] = "reverse"
    # teacher ids per token of the top-k KL; None: the whole vocabulary (the exact reverse KL, cheap
    # with this task's 99-token vocabulary)
    scope_topk_k: Optional[int] = None
    scope_topk_coef: float = 1.0          # algorithm.topk_kl_coef: its weight beside the sampled-token term
    # student log-probs from logits / rollout temperature (the reference code) or at T = 1 like the teacher's
    scope_scale_logits_by_rollout_temperature: bool = False
    eval_every: int = 30
    eval_n: int = 4
    eval_problems: int = 512
    max_new_tokens: int = 40
    model_seed: int = 0
    seed: int = 0

    @classmethod
    def tiny(cls) -> "DemoSettings":
        """A few steps of everything (tests)."""
        return cls(teacher_hidden=64, teacher_layers=2, teacher_ffn=128, teacher_sft_steps=3, student_hidden=32,
                   student_layers=1, student_ffn=64, student_sft_steps=2, sft_batch=8, held_out_problems=8,
                   scope_steps=2, scope_prompts=2, scope_group=2, eval_every=1, eval_n=2, eval_problems=3,
                   max_new_tokens=8)

    def algorithm_overrides(self) -> dict:
        """The ``algorithm.*`` fields of the SCOPE run beyond its preset."""
        out: dict = {"scale_logits_by_rollout_temperature": self.scope_scale_logits_by_rollout_temperature,
                     "topk_kl": self.scope_topk_kl}
        if self.scope_topk_kl is not None:
            out.update(topk_tail=True, topk_k=self.topk_k(), **self.topk_coef_override())
        return out

    def topk_coef_override(self) -> dict:
        """``{"topk_kl_coef": ...}`` when it is not the config's default 1 (configs stay as they were)."""
        return {} if self.scope_topk_coef == 1.0 else {"topk_kl_coef": self.scope_topk_coef}

    def topk_k(self) -> int:
        """``algorithm.topk_k`` of the top-k KL: ``scope_topk_k``, or the tokenizer's vocabulary size."""
        return self.scope_topk_k if self.scope_topk_k is not None else tiny_vocab_size()

    def topk_label(self) -> str:
        """``top-K`` or ``full-vocabulary`` (K = the vocabulary size: nothing is left for the tail bucket)."""
        k = self.topk_k()
        return "full-vocabulary" if k >= tiny_vocab_size() else f"top-{k}"

    def method_label(self) -> str:
        """What the SCOPE run optimises, in words (table and plot titles)."""
        kl = "SCOPE" if self.scope_topk_kl is None else f"SCOPE + {self.topk_label()} {self.scope_topk_kl} KL"
        if self.scope_scale_logits_by_rollout_temperature:
            kl += f", student log-probs at T={self.scope_temperature}"
        return kl

    def cache_key(self, role: str) -> str:
        keys = {"teacher": ("teacher_hidden", "teacher_layers", "teacher_ffn", "teacher_sft_steps", "teacher_lr"),
                "student": ("student_hidden", "student_layers", "student_ffn", "student_sft_steps", "student_lr")}[role]
        d = asdict(self)
        return "-".join(f"{d[k]}" for k in keys + ("sft_batch", "held_out_problems", "model_seed"))


# ------------------------------------------------------------------------------------------ steps
def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    return env


_STEP_LINE = re.compile(r"step (\d+) \| loss (\S+).*?\| acc (\S+)")


def run_training(config: dict, config_path: Path, label: str, total_steps: int, log_path: Path,
                 echo: Callable[[str], None] = print, every: int = 10) -> None:
    """``python -m scope_megatron.train --config config_path`` with a compact progress display;
    the full log goes to ``log_path``. Raises RuntimeError (with the log's tail) on failure."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "scope_megatron.train", "--config", str(config_path)]
    start = time.monotonic()
    tail: list[str] = []
    with log_path.open("w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                     env=_env(), bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            m = _STEP_LINE.search(line)
            if m and "metrics" in line:
                step = int(m.group(1))
                if step == 1 or step % every == 0 or step == total_steps:
                    evals = re.findall(r"eval/mean/avg@\d+ ([0-9.eE+-]+\d)", line)
                    extra = f", held-out avg {float(evals[0]):.1%}" if evals else ""
                    acc = "" if config.get("algorithm", {}).get("preset") in ("sft", "kd") else f", rollout acc {float(m.group(3)):.2f}"
                    echo(f"      {label} step {step:>4}/{total_steps}: loss {float(m.group(2)):.3f}{acc}{extra} "
                         f"({time.monotonic() - start:.0f} s)")
            elif "eval at step 0" in line:
                found = re.findall(r"eval/mean/avg@1 ([0-9.eE+-]*\d)", line)
                if found:
                    echo(f"      {label} step    0/{total_steps}: held-out avg@1 {float(found[0]):.1%} "
                         f"({time.monotonic() - start:.0f} s)")
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{label} failed (exit {code}); log: {log_path}\n" + "\n".join(tail[-15:]))


def sft_config(model: Path, train: Path, run_dir: Path, steps: int, lr: float, batch: int, seed: int) -> dict:
    """A training-loop config for plain SFT on (prompt, solution) records (``algorithm.preset: sft``)."""
    return {
        "run_dir": str(run_dir), "steps": steps, "seed": seed,
        "model": {"student": str(model)},
        "parallel": {"micro_batch_size": batch},
        "data": {"paths": [str(train)], "max_prompt_tokens": 256},
        "rollout": {"prompts_per_step": batch},
        "algorithm": {"preset": "sft"},
        "optimizer": {"lr": lr, "weight_decay": 0.0, "lr_warmup_steps": min(10, steps // 4)},
        "checkpoint": {"every": 0, "keep_last": 1, "save_at_end": False, "export_hf_steps": [steps]},
        "logging": {"tqdm": False},
    }


def scope_config(student: Path, teacher: Path, train: Path, test: Path, run_dir: Path, s: DemoSettings,
                 preset: str = "scope", group_size: int | None = None, seed: int | None = None,
                 algorithm_overrides: dict | None = None) -> dict:
    """The SCOPE run: embedded engines, weight sync with probe check, math-verify rewards, in-loop eval.

    ``algorithm_overrides`` are ``algorithm.*`` fields set last (``{"topk_kl": None}`` turns the
    demo's top-k KL off, ``{"topk_kl": "reverse"}`` on)."""
    return {
        "run_dir": str(run_dir), "steps": s.scope_steps, "seed": s.seed if seed is None else seed,
        "model": {"student": str(student)},
        "parallel": {"micro_batch_size": 16},
        "data": {"paths": [str(train)], "max_prompt_tokens": 256},
        "rollout": {"prompts_per_step": s.scope_prompts, "group_size": group_size or s.scope_group,
                    "max_new_tokens": s.max_new_tokens, "temperature": s.scope_temperature, "max_retries": 1,
                    "request_timeout_s": 300, "embedded_max_batch_size": 256},
        "teacher": {"model": str(teacher), "embedded_max_batch_size": 64},
        "algorithm": {"preset": preset, "reward_workers": 1, **s.algorithm_overrides(), **(algorithm_overrides or {})},
        "optimizer": {"lr": s.scope_lr, "weight_decay": 0.0},
        "sync": {"bucket_mb": 16, "timeout_s": 300},
        "checkpoint": {"every": 0, "keep_last": 1, "save_at_end": False},
        "eval": {"every": s.eval_every, "at_start": True, "benchmarks": [str(test)], "limit": s.eval_problems,
                 "n": s.eval_n, "ks": [1, s.eval_n], "max_new_tokens": s.max_new_tokens},
        "logging": {"tqdm": False},
    }


def train_sft_model(role: str, cache: Path, train: Path, s: DemoSettings, echo: Callable[[str], None] = print) -> Path:
    """The cached SFT-trained teacher or student HF directory (trained now if missing)."""
    from .tiny_models import save_tiny_hf_model

    final = cache / f"{role}_hf"
    key_file = final / "demo_cache_key.txt"
    key = s.cache_key(role)
    if (final / "config.json").is_file() and key_file.is_file() and key_file.read_text() == key:
        echo(f"      cached: {final}")
        return final
    hidden, layers, ffn, steps, lr = (getattr(s, f"{role}_{k}") for k in ("hidden", "layers", "ffn", "sft_steps", "lr"))
    work = cache / f"{role}_work"
    shutil.rmtree(work, ignore_errors=True)
    init = work / "init_hf"
    save_tiny_hf_model(init, "qwen3", seed=s.model_seed + (1 if role == "teacher" else 2), hidden_size=hidden,
                       intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(str(init / "model.safetensors")).values())
    echo(f"      {role}: Qwen3 architecture, {layers} layers, hidden {hidden}, {params:,} parameters; "
         f"SFT {steps} steps x {s.sft_batch} through the training loop (algorithm.preset=sft)")
    config = sft_config(init, train, work / "sft", steps, lr, s.sft_batch, s.model_seed)
    run_training(config, work / "sft.yaml", f"{role} SFT", steps, work / "sft.log", echo=echo, every=50)
    exported = work / "sft" / "hf" / f"step_{steps:08d}"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(exported, final)
    key_file.write_text(key)
    return final


def evaluate_model(model: Path, test: Path, out: Path, s: DemoSettings, *, seed: int | None = None,
                   n: int | None = None, limit: int | None = -1, temperature: float = 0.6, top_p: float = 0.95,
                   top_k: int = 20, max_batch_size: int = 256) -> dict:
    """The ``results.json`` object of evaluating an HF model on ``test`` (embedded engine,
    math-verify), cached in ``out``. Defaults: ``s.model_seed``, ``s.eval_n`` samples of the first
    ``s.eval_problems`` problems (``limit=None``: all), the in-loop evaluation's sampling."""
    from transformers import AutoTokenizer

    from ..evaluation.runner import EvalSettings, run_evaluation
    from ..evaluation.benchmarks import load_benchmarks
    from ..rollout.client import SGLangClient
    from ..rollout.embedded_server import start_embedded_server_process
    from ..rollout.rewards import MathRewardPool

    results = out / "results.json"
    if results.is_file():
        return json.loads(results.read_text())
    seed = s.model_seed if seed is None else seed
    n = s.eval_n if n is None else n
    limit = s.eval_problems if limit == -1 else limit
    out.mkdir(parents=True, exist_ok=True)
    handle = start_embedded_server_process(model, extra_args=[
        "--dtype", "float32", "--device", "cpu", "--max-batch-size", str(max_batch_size), "--log-level", "warning",
        "--enable-deterministic-inference"],  # the eval's sampling_seed is honoured only so
        log_path=out / "engine.log", ready_timeout=300)
    try:
        settings = EvalSettings(n=n, ks=(1, n), max_new_tokens=s.max_new_tokens, seed=seed, temperature=temperature,
                                top_p=top_p, top_k=top_k)
        with MathRewardPool(num_workers=1, timeout_s=10.0) as pool:
            run_evaluation(SGLangClient(handle.url, max_concurrency=max_batch_size),
                           load_benchmarks([test], limit=limit), AutoTokenizer.from_pretrained(model),
                           settings, out, reward_pool=pool, model_name=str(model), progress=False)
    finally:
        handle.stop()
    return json.loads(results.read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def accuracy_curves(metrics: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(held-out avg@1 per evaluated step, rollout accuracy per training step) from metrics.jsonl."""
    held = [(int(m["step"]), float(m["eval/mean/avg@1"])) for m in metrics if "eval/mean/avg@1" in m]
    rollout = [(int(m["step"]), float(m["reward/accuracy"])) for m in metrics if "reward/accuracy" in m]
    return held, rollout


def held_out_errors(metrics: list[dict]) -> list[float]:
    """The standard error of each held-out avg@1 in :func:`accuracy_curves` (0 where not recorded)."""
    return [float(m.get("eval/mean/avg@1_se", 0.0)) for m in metrics if "eval/mean/avg@1" in m]


def plot_accuracy(metrics: list[dict], teacher_avg: float | None, path: Path, title: str = "SCOPE demo") -> Path:
    """Held-out Avg@1 against step with 95% error bars (1.96 standard errors over problems), the
    rollout accuracy on training prompts, and the teacher's held-out Avg@1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held, rollout = accuracy_curves(metrics)
    errors = held_out_errors(metrics)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if rollout:
        ax.plot(*zip(*rollout), color="tab:blue", alpha=0.35, label="student: rollout accuracy (train prompts)")
    if held:
        steps, values = zip(*held)
        ax.errorbar(steps, values, yerr=[1.96 * e for e in errors], fmt="o-", color="tab:blue", capsize=3,
                    label="student: held-out Avg@1 (95% interval)")
    if teacher_avg is not None:
        ax.axhline(teacher_avg, color="tab:green", ls="--", label=f"teacher: held-out Avg@1 ({teacher_avg:.0%})")
    ax.set_xlabel("SCOPE step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pct_se(value: float, se: float | None) -> str:
    return f"{value:.1%}" if se is None else f"{value:.1%} ± {1.96 * se:.1%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scope-megatron demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="output directory (default runs/demo-<time>)")
    parser.add_argument("--cache", default="runs/demo-cache", help="task, teacher and student cache")
    parser.add_argument("--steps", type=int, default=None, help="SCOPE steps (default 60)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the SCOPE run's seed (data order, sampling); the teacher, student and task stay the same")
    parser.add_argument("--no-topk", action="store_true",
                        help="the paper's SCOPE only (sampled-token KL estimator), without the top-k KL term")
    parser.add_argument("--scale-logits-by-rollout-temperature", action="store_true",
                        help="student log-probs from logits / rollout temperature, as the reference code does "
                             "(the teacher's stay at 1); default: both at 1")
    parser.add_argument("--tiny", action="store_true", help="a few steps of everything (smoke test)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    s = DemoSettings.tiny() if args.tiny else DemoSettings()
    if args.steps:
        s.scope_steps = args.steps
    s.seed = args.seed
    if args.no_topk:
        s.scope_topk_kl = None
    if args.scale_logits_by_rollout_temperature:
        s.scope_scale_logits_by_rollout_temperature = True
    start = time.monotonic()
    run = Path(args.run_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    cache = Path(args.cache).resolve() / ("tiny" if args.tiny else "default")
    run.mkdir(parents=True, exist_ok=True)

    def echo(text: str) -> None:
        print(text, flush=True)

    echo(f"SCOPE demo -> {run}")
    echo("[1/5] task: two-digit addition, answer in \\boxed{}, math-verify rewards")
    task = write_task(cache / "task", seed=s.model_seed, num_test=s.held_out_problems)
    echo(f"      {task['train']} (train, with solutions), {task['test']} (held out; first {s.eval_problems} used)")

    echo("[2/5] teacher (cached after the first run)")
    teacher = train_sft_model("teacher", cache, task["train"], s, echo)
    teacher_dir = cache / "teacher_eval" / (s.cache_key("teacher") + f"-eval{s.eval_problems}x{s.eval_n}")
    teacher_json = evaluate_model(teacher, task["test"], teacher_dir, s)
    teacher_avg = float(teacher_json["mean"]["avg@1"])
    echo(f"      teacher held-out Avg@1: {teacher_avg:.1%}")

    echo("[3/5] student: smaller, briefly SFT-ed (cached)")
    student = train_sft_model("student", cache, task["train"], s, echo)

    echo(f"[4/5] {s.method_label()}: {s.scope_steps} steps x {s.scope_prompts} prompts x {s.scope_group} rollouts, "
         f"seed {s.seed}; embedded engines, weight sync each step, held-out eval every {s.eval_every} steps")
    config = scope_config(student, teacher, task["train"], task["test"], run, s)
    run_training(config, run / "scope.yaml", "SCOPE", s.scope_steps, run / "train.log", echo=echo,
                 every=max(1, s.eval_every // 2))

    echo("[5/5] results")
    metrics = read_metrics(run)
    held, rollout = accuracy_curves(metrics)
    if not held:
        echo("no evaluation results in metrics.jsonl")
        return 1
    errors = held_out_errors(metrics)
    before, after = held[0][1], held[-1][1]
    n = s.eval_n
    evals = [m for m in metrics if "eval/mean/avg@1" in m]
    first, last = evals[0], evals[-1]
    plot = plot_accuracy(metrics, teacher_avg, run / "accuracy.png",
                         title=f"{s.method_label()} demo, seed {s.seed}")
    teacher_se = teacher_json.get("mean_standard_errors", {})
    rows = [("student before SCOPE", before, errors[0], first.get(f"eval/mean/pass@{n}")),
            (f"student after {held[-1][0]} steps of {s.method_label()}", after, errors[-1],
             last.get(f"eval/mean/pass@{n}")),
            ("teacher", teacher_avg, teacher_se.get("avg@1"), teacher_json["mean"].get(f"pass@{n}"))]
    table = [f"| model ({s.eval_problems} held-out problems, n={n}; ± 95% interval) | Avg@1 | Pass@{n} |",
             "|---|---|---|"]
    table += [f"| {name} | {_pct_se(a, se)} | {'-' if p is None else f'{p:.1%}'} |" for name, a, se, p in rows]
    seconds = time.monotonic() - start
    summary = {"run_dir": str(run), "method": s.method_label(), "seed": s.seed,
               "student_before_avg@1": before, "student_after_avg@1": after, "gain": after - before,
               "student_before_avg@1_se": errors[0], "student_after_avg@1_se": errors[-1],
               "teacher_avg@1": teacher_avg, "held_out_curve": held, "held_out_curve_se": errors,
               "seconds": round(seconds, 1), "settings": asdict(s), "teacher": str(teacher),
               "student_init": str(student)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run / "results.md").write_text("\n".join(table) + "\n")
    echo("")
    echo("\n".join(table))
    echo("")
    echo("held-out Avg@1 by step: " + ", ".join(f"{st}: {v:.0%}" for st, v in held))
    echo(f"done in {seconds / 60:.1f} min")
    echo(f"  plot:        {plot}")
    echo(f"  TensorBoard: tensorboard --logdir {run / 'tensorboard'}")
    echo(f"  metrics:     {run / 'metrics.jsonl'}; eval records: {run / 'eval'}/; log: {run / 'train.log'}")
    echo(f"  summary:     {run / 'summary.json'}, {run / 'results.md'}; teacher/student cache: {cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
