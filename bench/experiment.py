"""Small-scale comparison of SCOPE with its baselines and ablations on the demo's synthetic task.

Runs SCOPE, OPD (G=1 and G=8), GRPO, KD and the paper's five SCOPE ablations from the same
student (the demo's cached, briefly SFT-ed student) against the same teacher (the demo's SFT
teacher), several seeds each (default 0-4), through ``scope_megatron.train`` (embedded engines,
weight sync, math-verify rewards, in-loop held-out evaluation). With ``--topk both`` (default)
every KL-path method (scope*, opd*) runs a second time with the top-k reverse KL to the teacher
added to its KL path (``algorithm.topk_kl=reverse, topk_tail=true``); GRPO and KD have no KL path
and run once.

Reported per method (``OUT/results.md``, ``OUT/results.json``, written after every run): the
mean held-out Avg@1 after training with its 95% Student-t interval over seeds, the gain over
the start (the student before training, same seed) and the paired difference to SCOPE (per-seed
differences, seeds present in both, their mean and 95% t-interval); ``OUT/accuracy_by_step.png``
plots held-out Avg@1 against step (mean over seeds, 95% t-band).

KD (``algorithm.preset: kd``) is SFT on teacher text: for each seed the teacher samples one
response (rollout temperature, seed-derived sampling seeds) for ``steps x prompts`` training
prompts, the student trains on them for ``steps`` steps of ``prompts`` records, and the exported
student is evaluated like the in-loop evaluation of the other methods (same problems, n, sampling
and seed), before and after.

Resumable: a run whose ``metrics.jsonl`` has the final evaluation (KD: ``heldout.json``) and whose
config is unchanged is not run again.

    python bench/experiment.py                       # every method, seeds 0-4, the demo's settings
    python bench/experiment.py --steps 40 --seeds 0 1 2 --methods scope opd_g1 grpo --topk off
    python bench/experiment.py --tiny --seeds 0 --methods scope kd   # smoke test (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scope_megatron.examples import demo  # noqa: E402

T = TypeVar("T")
R = TypeVar("R")

# name -> (algorithm.preset, group size or None for the settings' G)
METHODS: dict[str, tuple[str, int | None]] = {
    "scope": ("scope", None),
    "opd_g1": ("opd", 1),
    "opd_g8": ("opd", 8),
    "grpo": ("grpo", None),
    "kd": ("kd", None),
    "scope_uniform": ("scope_uniform", None),
    "scope_no_student_weight": ("scope_no_student_weight", None),
    "scope_no_teacher_weight": ("scope_no_teacher_weight", None),
    "scope_opposite_student": ("scope_opposite_student", None),
    "scope_opposite_teacher": ("scope_opposite_teacher", None),
    "scope_rollout_temp": ("scope", None),
}
# algorithm.* fields a method sets beyond its preset: SCOPE with the student's log-probs at the
# rollout temperature (the reference code's and the paper configs' choice; the demo takes them at 1)
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "scope_rollout_temp": {"scale_logits_by_rollout_temperature": True},
}
REFERENCE = "scope"
TOPK_SUFFIX = "+topk"
# algorithm overrides of the two tables; the plain one names topk_kl explicitly so that a demo
# default with the top-k KL on does not leak into it
PLAIN_OVERRIDES: dict[str, Any] = {"topk_kl": None, "topk_tail": None}
TOPK_OVERRIDES: dict[str, Any] = {"topk_kl": "reverse", "topk_tail": True}

# Two-sided 95% critical values t_{0.975, df} of Student's t distribution, df = 1..30, from the
# NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.2 ("Critical values of the
# Student's t distribution", column 0.975); tests/test_experiment.py checks them against a
# numerical integration of the t density.
T_975: tuple[float, ...] = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
Z_975 = 1.959963984540054  # the standard normal's 0.975 quantile


# ------------------------------------------------------------------------------------------ statistics
def t_critical_95(df: int) -> float:
    """``t_{0.975, df}``: the half-width multiplier of a two-sided 95% Student-t interval.

    df 1..30 from the table :data:`T_975`; larger df from the Cornish-Fisher expansion of the t
    quantile in the normal one (Abramowitz & Stegun 26.7.5), accurate to 1e-4 there."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided 95% Student-t interval ``mean +- half_width``
    (``half_width`` and ``sd`` are None for fewer than two values: no interval)."""

    n: int
    mean: float
    sd: float | None
    half_width: float | None

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "low": self.low, "high": self.high}


def t_interval(values: Sequence[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (sample sd with n - 1, half-width t_{0.975,n-1} sd / sqrt(n))."""
    if not values:
        raise ValueError("t_interval needs at least one value")
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(n=n, mean=mean, sd=None, half_width=None)
    sd = statistics.stdev(values)
    return Interval(n=n, mean=mean, sd=sd, half_width=t_critical_95(n - 1) * sd / math.sqrt(n))


def paired_differences(values: Mapping[int, float], reference: Mapping[int, float]) -> dict[int, float]:
    """``values[seed] - reference[seed]`` for the seeds present in both (by seed id), in seed order."""
    return {seed: values[seed] - reference[seed] for seed in sorted(set(values) & set(reference))}


def successful(rows: Iterable[Mapping[str, Any]], variant: str) -> dict[int, Mapping[str, Any]]:
    """seed -> row of ``variant``'s runs that finished with a held-out result."""
    return {int(r["seed"]): r for r in rows if r["variant"] == variant and r.get("after") is not None}


def figure_panels(rows: Iterable[Mapping[str, Any]], labels: Mapping[str, str], *, plain: Sequence[str],
                  with_topk: Sequence[str]) -> dict[str, dict[str, dict[int, Any]]]:
    """The figure's panels, as the tables: ``{panel: {label: {seed: curve}}}`` for the variants of the
    plain table and of the top-k table (which lists GRPO and KD too); an empty list gives no panel."""
    rows = list(rows)
    return {panel: {labels[v]: {sd: r["curve"] for sd, r in successful(rows, v).items()} for v in names}
            for panel, names in (("without top-k KL", plain), ("with top-k KL", with_topk)) if names}


def failure_reason(error: str, width: int = 120) -> str:
    """One line of a run's error for the table: the log tail's last line naming an error, else its first line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if not lines:
        return "failed (no message)"
    named = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    line = named[-1] if named else lines[0]
    line = line.replace("|", "/")
    return line if len(line) <= width else line[: width - 3] + "..."


def summarize_variant(rows: Sequence[Mapping[str, Any]], variant: str, reference: str | None) -> dict[str, Any]:
    """The numbers of one table row: after / gain / difference-to-reference intervals and failures."""
    ok = successful(rows, variant)
    failed = [{"seed": int(r["seed"]), "reason": failure_reason(str(r["error"]))}
              for r in sorted(rows, key=lambda r: r["seed"]) if r["variant"] == variant and r.get("error")]
    out: dict[str, Any] = {"variant": variant, "seeds": sorted(ok), "failed": failed}
    if not ok:
        return out
    after = {seed: float(r["after"]) for seed, r in ok.items()}
    before = {seed: float(r["before"]) for seed, r in ok.items()}
    out["after"] = t_interval([after[s] for s in sorted(after)]).to_json()
    out["before_mean"] = statistics.fmean(before.values())
    out["gain"] = t_interval(list(paired_differences(after, before).values())).to_json()
    accs = [float(r["rollout_acc_last5"]) for r in ok.values() if r.get("rollout_acc_last5") is not None]
    out["rollout_acc_last5_mean"] = statistics.fmean(accs) if accs else None
    if reference is not None and reference != variant:
        ref = {seed: float(r["after"]) for seed, r in successful(rows, reference).items()}
        diffs = paired_differences(after, ref)
        out["reference"] = reference
        out["diff_vs_reference"] = ({**t_interval(list(diffs.values())).to_json(), "seeds": list(diffs)}
                                    if diffs else None)
    return out


def _pct(iv: Mapping[str, Any] | None) -> str:
    if not iv:
        return "-"
    if iv["half_width"] is None:
        return f"{iv['mean']:.1%} (1 seed, no interval)"
    return f"{iv['mean']:.1%} [{iv['low']:.1%}, {iv['high']:.1%}]"


def _pp(iv: Mapping[str, Any] | None) -> str:
    """A difference in percentage points with its interval."""
    if not iv:
        return "-"
    text = f"{100 * iv['mean']:+.1f} pp"
    if iv["half_width"] is None:
        return text + f" (n={iv['n']}, no interval)"
    return text + f" [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}] (n={iv['n']})"


def build_table(rows: Sequence[Mapping[str, Any]], variants: Sequence[str], reference: str | None,
                labels: Mapping[str, str] | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """A markdown table (one row per variant) and its numbers.

    ``rows``: one per run, with ``variant``, ``preset``, ``group_size``, ``seed`` and either
    ``before`` / ``after`` (held-out Avg@1 at the start and at the end; ``rollout_acc_last5``
    optional) or ``error``. A variant whose runs all failed shows ``failed`` with the reason;
    partial failures are counted in their own column."""
    labels = labels or {}
    header = ["method", "preset", "G", "seeds", "held-out Avg@1 after [95% CI]", "gain over start [95% CI]",
              f"difference to {labels.get(reference, reference) if reference else '-'} (paired by seed) [95% CI]",
              "rollout acc, last 5 steps", "failed runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary: dict[str, dict[str, Any]] = {}
    for variant in variants:
        info = summarize_variant(rows, variant, reference)
        summary[variant] = info
        mine = [r for r in rows if r["variant"] == variant]
        preset = mine[0]["preset"] if mine else ""
        group = mine[0].get("group_size", "") if mine else ""
        failed = "; ".join(f"seed {f['seed']}: {f['reason']}" for f in info["failed"]) or "-"
        name = labels.get(variant, variant)
        if "after" not in info:
            status = "failed" if info["failed"] else "not run"
            lines.append(f"| {name} | {preset} | {group} | 0 | {status} | - | - | - | {failed} |")
            continue
        acc = info["rollout_acc_last5_mean"]
        diff = "(reference)" if variant == reference else _pp(info.get("diff_vs_reference"))
        lines.append(f"| {name} | {preset} | {group} | {len(info['seeds'])} | {_pct(info['after'])} | "
                     f"{_pp(info['gain'])} | {diff} | {'-' if acc is None else f'{acc:.1%}'} | {failed} |")
    return "\n".join(lines) + "\n", summary


# ------------------------------------------------------------------------------------------ figure
def mean_curve(curves: Mapping[int, Sequence[tuple[int, float]]]) -> list[tuple[int, Interval]]:
    """(step, t-interval over the seeds evaluated at that step) for every step any seed has."""
    by_step: dict[int, list[float]] = {}
    for curve in curves.values():
        for step, value in curve:
            by_step.setdefault(int(step), []).append(float(value))
    return [(step, t_interval(values)) for step, values in sorted(by_step.items())]


def plot_accuracy_by_step(panels: Mapping[str, Mapping[str, Mapping[int, Sequence[tuple[int, float]]]]],
                          path: Path, teacher_avg: float | None = None, title: str = "") -> Path:
    """Held-out Avg@1 against step: one panel per table (``panels[title][label][seed] = curve``),
    per method the mean over seeds and a band of its 95% Student-t interval (no band at steps with
    a single seed), the teacher's Avg@1 as a dashed line. Writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {name: methods for name, methods in panels.items() if any(methods.values())} or {"no results": {}}
    # more than a few curves: the legend goes below its panel, where it hides none of them
    most = max(len(methods) for methods in panels.values()) + (teacher_avg is not None)
    below = most > 5
    height = 5 + (0.2 * math.ceil(most / 2) if below else 0)
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), height), dpi=110, squeeze=False,
                             sharey=True)
    colors = plt.get_cmap("tab10").colors
    for ax, (panel, methods) in zip(axes[0], panels.items()):
        for i, (label, curves) in enumerate(methods.items()):
            points = mean_curve(curves)
            if not points:
                continue
            color = colors[i % len(colors)]
            style = "-" if i < len(colors) else "--"
            steps = [p[0] for p in points]
            ax.plot(steps, [p[1].mean for p in points], style, marker="o", ms=3, color=color,
                    label=f"{label} (n={len(curves)})")
            banded = [(st, iv) for st, iv in points if iv.half_width is not None]
            if banded:
                ax.fill_between([st for st, _ in banded], [iv.low for _, iv in banded],
                                [iv.high for _, iv in banded], color=color, alpha=0.12, lw=0)
        if teacher_avg is not None:
            ax.axhline(teacher_avg, color="k", ls=":", lw=1, label=f"teacher ({teacher_avg:.0%})")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if below:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=7)
        else:
            ax.legend(loc="lower right", fontsize=7)
    axes[0][0].set_ylabel("held-out Avg@1 (mean over seeds, band: 95% t-interval)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ runs
def kl_path(preset: str) -> bool:
    """Whether ``preset``'s objective has a KL path (where the top-k KL can be added)."""
    from scope_megatron.objective import ObjectiveConfig

    return ObjectiveConfig.preset(preset).method in ("scope", "opd")


def variants_for(methods: Sequence[str], topk: str) -> list[tuple[str, str, bool]]:
    """(variant name, method, with top-k KL) of every table row, plain ones first.

    ``topk``: ``off`` (plain runs only), ``on`` (KL-path methods with the top-k KL only; the
    others plain) or ``both`` (plain runs, then the KL-path methods again with the top-k KL)."""
    out: list[tuple[str, str, bool]] = []
    if topk in ("off", "both"):
        out += [(m, m, False) for m in methods]
    if topk in ("on", "both"):
        if topk == "on":
            out += [(m, m, False) for m in methods if not kl_path(METHODS[m][0])]
        out += [(m + TOPK_SUFFIX, m, True) for m in methods if kl_path(METHODS[m][0])]
    return out


def evaluate_hf(model: Path, benchmark: Path, out: Path, s: demo.DemoSettings, *, seed: int, n: int,
                limit: int | None, temperature: float = 0.6, top_p: float = 0.95, top_k: int = 20) -> dict:
    """``results.json`` of evaluating an HF model on ``benchmark`` (:func:`demo.evaluate_model`), cached in ``out``.

    The defaults are the in-loop evaluation's (``eval.*`` of the config, seed = the run's seed),
    so a KD student is scored on the same samples' seeds as the other methods' students."""
    return demo.evaluate_model(model, benchmark, out, s, seed=seed, n=n, limit=limit, temperature=temperature,
                               top_p=top_p, top_k=top_k, max_batch_size=64)


def kd_teacher_data(teacher: Path, train: Path, run: Path, s: demo.DemoSettings, seed: int) -> tuple[Path, float]:
    """``run/kd_train.jsonl``: ``scope_steps x scope_prompts`` training prompts (a seeded sample)
    with one teacher response each as ``solution``, sampled like the rollouts (rollout temperature,
    no top-p / top-k, sampling seeds from ``seed``); also returns the teacher samples' accuracy."""
    records = [json.loads(line) for line in train.read_text().splitlines() if line.strip()]
    count = min(len(records), s.scope_steps * s.scope_prompts)
    chosen = random.Random(seed).sample(records, count)
    prompts = run / "kd_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": r["id"], "problem": r["problem"], "answer": r["answer"]}) + "\n"
                               for r in chosen))
    samples_dir = run / f"teacher_samples-{count}"
    evaluate_hf(teacher, prompts, samples_dir, s, seed=seed, n=1, limit=None, temperature=s.scope_temperature,
                top_p=1.0, top_k=-1)
    by_id: dict[str, dict] = {}
    for path in sorted((samples_dir / "records").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_id[record["id"]] = record
    rows, correct = [], 0
    for r in chosen:
        sample = by_id[r["id"]]["samples"][0]
        correct += bool(sample["correct"])
        rows.append({"id": r["id"], "problem": r["problem"], "answer": r["answer"], "solution": sample["text"]})
    data = run / "kd_train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, correct / max(1, len(rows))


def kd_config(student: Path, data: Path, run: Path, s: demo.DemoSettings, seed: int) -> dict:
    """The KD run: the demo's SFT config with ``algorithm.preset: kd`` on teacher samples, the SCOPE
    runs' learning rate (no warm-up, no weight decay) and B records a step; the final student exported."""
    config = demo.sft_config(student, data, run, s.scope_steps, s.scope_lr, s.scope_prompts, seed)
    config["parallel"] = {"micro_batch_size": 16}
    config["algorithm"] = {"preset": "kd"}
    config["optimizer"] = {"lr": s.scope_lr, "weight_decay": 0.0}
    return config


def _same_config(path: Path, config: dict) -> bool:
    return path.is_file() and yaml.safe_load(path.read_text()) == config


def run_kd(student: Path, teacher: Path, task: Mapping[str, Path], run: Path, s: demo.DemoSettings, seed: int,
           label: str) -> dict[str, Any]:
    """Teacher samples, KD training, and the held-out evaluation before / after (``run/heldout.json``)."""
    run.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run / "eval_after", ignore_errors=True)  # scored an earlier run's student
    data, teacher_acc = kd_teacher_data(teacher, task["train"], run, s, seed)
    config = kd_config(student, data, run, s, seed)
    demo.run_training(config, run / "config_in.yaml", label, s.scope_steps, run / "train.log",
                      echo=say, every=max(1, s.scope_steps // 4))
    limit = s.eval_problems
    before = evaluate_hf(student, task["test"], run.parent / "student_eval" / f"seed{seed}-{limit}x{s.eval_n}", s,
                         seed=seed, n=s.eval_n, limit=limit)
    final = run / "hf" / f"step_{s.scope_steps:08d}"
    after = evaluate_hf(final, task["test"], run / "eval_after", s, seed=seed, n=s.eval_n, limit=limit)
    held = {"steps": s.scope_steps, "teacher_sample_accuracy": teacher_acc,
            "curve": [[0, before["mean"]["avg@1"]], [s.scope_steps, after["mean"]["avg@1"]]]}
    (run / "heldout.json").write_text(json.dumps(held, indent=2) + "\n")
    return held


def method_config(method: str, topk: bool, student: Path, teacher: Path, task: Mapping[str, Path], run: Path,
                  s: demo.DemoSettings, seed: int) -> dict[str, Any]:
    """The training config of one run of ``method`` (with the top-k KL on its KL path if ``topk``)."""
    preset, group = METHODS[method]
    if method == "kd":
        return kd_config(student, run / "kd_train.jsonl", run, s, seed)
    overrides = {**(TOPK_OVERRIDES if topk else PLAIN_OVERRIDES),
                 **({"topk_k": s.topk_k(), **s.topk_coef_override()} if topk else {}),
                 **METHOD_OVERRIDES.get(method, {})}
    return demo.scope_config(student, teacher, task["train"], task["test"], run, s, preset=preset,
                             group_size=group, seed=seed, algorithm_overrides=overrides)


def finished(run: Path, method: str, config: dict | None, steps: int) -> bool:
    """Whether ``run`` holds a finished run of these settings (same config, the final evaluation)."""
    if config is not None and not _same_config(run / "config_in.yaml", config):
        return False
    if method == "kd":
        path = run / "heldout.json"
        return path.is_file() and json.loads(path.read_text()).get("steps") == steps
    return any("eval/mean/avg@1" in m and m["step"] == steps for m in demo.read_metrics(run))


def run_result(run: Path, method: str) -> dict[str, Any]:
    """before / after / curve / rollout accuracy of a finished run."""
    if method == "kd":
        held = json.loads((run / "heldout.json").read_text())
        curve = [(int(st), float(v)) for st, v in held["curve"]]
        return {"before": curve[0][1], "after": curve[-1][1], "curve": curve, "rollout_acc_last5": None,
                "teacher_sample_accuracy": held["teacher_sample_accuracy"]}
    held, rollout = demo.accuracy_curves(demo.read_metrics(run))
    return {"before": held[0][1], "after": held[-1][1], "curve": held,
            "rollout_acc_last5": statistics.fmean(a for _, a in rollout[-5:]) if rollout else None}


def settings_from_args(args: argparse.Namespace) -> demo.DemoSettings:
    """The demo's settings (``DemoSettings()`` or ``.tiny()``, read now) with the flags that were given."""
    s = demo.DemoSettings.tiny() if args.tiny else demo.DemoSettings()
    for flag, field_name in (("steps", "scope_steps"), ("prompts", "scope_prompts"), ("group", "scope_group"),
                             ("lr", "scope_lr"), ("eval_problems", "eval_problems"), ("eval_n", "eval_n"),
                             ("eval_every", "eval_every"), ("topk_k", "scope_topk_k"),
                             ("topk_coef", "scope_topk_coef")):
        value = getattr(args, flag)
        if value is not None:
            setattr(s, field_name, value)
    return s


def write_results(out: Path, header: str, tables: Sequence[tuple[str, str]], payload: dict) -> None:
    """``results.md`` (header and tables) and ``results.json`` (everything), each replaced atomically."""
    md = header + "".join(f"\n### {title}\n\n{table}" for title, table in tables)
    for name, text in (("results.md", md), ("results.json", json.dumps(payload, indent=2) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def say(line: str) -> None:
    """One progress line in one write, so that lines of runs going at once (``--jobs``) do not
    interleave (``print`` writes the text and its newline separately)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_pool(tasks: Sequence[T], jobs: int, work: Callable[[T], R], done: Callable[[R], None]) -> None:
    """``work(task)`` for every task, at most ``jobs`` at once, and ``done(result)`` for each in the
    order they finish, one call at a time, in the calling thread.

    Threads suffice: each run is its own training and engine processes, and on a small CPU a run
    spends much of its time waiting for them (generation, HTTP, weight sync), so several runs at
    once finish sooner than one after another (docs/experiment.md has the measured ratio)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1:
        for task in tasks:
            done(work(task))
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(work, task) for task in tasks]):
            done(future.result())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/experiment")
    parser.add_argument("--cache", default="runs/demo-cache", help="the demo's cache (teacher, student, task)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--topk", choices=("both", "off", "on"), default="both",
                        help="KL-path methods without the top-k KL (off), with it (on), or both tables (both)")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny settings and cache (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step B (default: the demo's)")
    parser.add_argument("--group", type=int, default=None,
                        help="rollouts per prompt G where the method does not fix it (default: the demo's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the demo's)")
    parser.add_argument("--topk-k", type=int, default=None,
                        help="teacher top-k ids per token of the top-k KL (default: the demo's; the vocabulary "
                             "size gives the full-distribution KL)")
    parser.add_argument("--topk-coef", type=float, default=None,
                        help="weight of the top-k KL beside the sampled-token term (default: the demo's)")
    parser.add_argument("--eval-problems", type=int, default=None, help="held-out problems (default: the demo's)")
    parser.add_argument("--eval-n", type=int, default=None, help="samples per held-out problem (default: the demo's)")
    parser.add_argument("--eval-every", type=int, default=None, help="held-out evaluation every N steps "
                                                                      "(default: the demo's; also at the start and end)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (default 1); each is its own processes, and a small CPU runs ~3 "
                             "in less time than one after another (docs/experiment.md)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    s = settings_from_args(args)
    if s.eval_problems > s.held_out_problems:
        parser.error(f"--eval-problems {s.eval_problems} exceeds the task's {s.held_out_problems} held-out problems")
    wall_start = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() / ("tiny" if args.tiny else "default")
    # the demo's task, teacher and student (demo.main's cache layout, so the demo's runs share them)
    task = demo.write_task(cache / "task", seed=s.model_seed, num_test=s.held_out_problems)
    print("teacher / student (the demo's, cached):", flush=True)
    teacher = demo.train_sft_model("teacher", cache, task["train"], s)
    student = demo.train_sft_model("student", cache, task["train"], s)
    teacher_dir = cache / "teacher_eval" / (s.cache_key("teacher") + f"-eval{s.eval_problems}x{s.eval_n}")
    teacher_avg = float(demo.evaluate_model(teacher, task["test"], teacher_dir, s)["mean"]["avg@1"])
    print(f"teacher held-out Avg@1 {teacher_avg:.1%}", flush=True)

    variants = variants_for(args.methods, args.topk)
    labels = {v: v.replace(TOPK_SUFFIX, f" + {s.topk_label()} rev. KL") for v, _, _ in variants}
    plain = [v for v, _, topk in variants if not topk]
    with_topk = [v for v, _, topk in variants if topk]
    # the top-k table compares with SCOPE + top-k and lists the no-KL-path methods' (single) runs too
    topk_table = with_topk + [v for v in plain if not kl_path(METHODS[v][0])]
    # rows of the top-k table and curves of its figure panel (with --topk on, plain holds only grpo / kd)
    topk_names = topk_table if args.topk == "both" else with_topk + plain
    rows: list[dict[str, Any]] = []
    total = len(variants) * len(args.seeds)

    def report(final: bool) -> None:
        tables: list[tuple[str, str]] = []
        summary: dict[str, Any] = {}
        if plain and args.topk != "on":
            table, summary["plain"] = build_table(rows, plain, REFERENCE if REFERENCE in plain else None, labels)
            tables.append(("KL path: the paper's sampled-token estimator (algorithm.topk_kl: null)", table))
        if with_topk:
            ref = REFERENCE + TOPK_SUFFIX
            names = topk_names
            table, summary["topk"] = build_table(rows, names, ref if ref in names else None, labels)
            tables.append((f"KL path + {s.topk_label()} reverse KL with tail bucket (algorithm.topk_kl=reverse, "
                           f"topk_tail=true); grpo / kd: no KL path, the same runs as above", table))
            if args.topk == "both":
                effect, summary["topk_effect"] = _topk_effect_table(rows, with_topk, labels)
                tables.append(("Effect of the top-k KL: each KL-path method with it minus without it (paired by seed)",
                               effect))
        befores = [r["before"] for r in rows if r.get("before") is not None]
        done = sum(1 for r in rows if r.get("after") is not None)
        failed = sum(1 for r in rows if r.get("error"))
        wall = time.monotonic() - wall_start
        run_seconds = sum(float(r.get("seconds") or 0.0) for r in rows)
        header = (f"# Method comparison on the demo task{' (partial)' if not final else ''}\n\n"
                  f"Held-out Avg@1 on {s.eval_problems} two-digit additions (n={s.eval_n} samples each, T=0.6) after "
                  f"{s.scope_steps} steps of B={s.scope_prompts} prompts (G={s.scope_group} unless the method fixes "
                  f"it), lr {s.scope_lr:g}, seeds {args.seeds}. Start (student, mean over runs) "
                  f"{statistics.fmean(befores) if befores else float('nan'):.1%}, teacher {teacher_avg:.1%}. "
                  f"Intervals: 95% Student-t over seeds; differences paired by seed (seeds present in both).\n\n"
                  f"Runs: {done} finished, {failed} failed, of {total}, {args.jobs} at a time. "
                  f"Wall time of this invocation {wall / 60:.1f} min; the runs' own times add up to {run_seconds / 60:.1f} min.\n")
        payload = {"settings": asdict(s), "args": vars(args), "teacher_avg@1": teacher_avg, "runs": rows,
                   "summary": summary, "wall_time_s": round(wall, 1), "complete": final}
        write_results(out, header, tables, payload)
        panels = figure_panels(rows, labels, plain=plain if args.topk != "on" else [],
                               with_topk=topk_names if with_topk else [])
        plot_accuracy_by_step(panels, out / "accuracy_by_step.png", teacher_avg,
                              title=f"held-out Avg@1 ({s.eval_problems} problems, n={s.eval_n}); mean over seeds, "
                                    f"band: 95% t-interval")
        if final:
            print()
            print((out / "results.md").read_text())

    tasks = [(variant, method, topk, seed) for variant, method, topk in variants for seed in args.seeds]
    order = {(variant, seed): i for i, (variant, _, _, seed) in enumerate(tasks)}

    def one_run(index: int, variant: str, method: str, topk: bool, seed: int) -> dict[str, Any]:
        """Runs (or finds finished) one method x seed; its table row. Called from several threads
        with ``--jobs`` > 1: it touches only its own run directory."""
        preset, group = METHODS[method]
        label = f"{variant} seed {seed}"
        run = out / f"{variant}-seed{seed}"
        row: dict[str, Any] = {"variant": variant, "method": method, "topk_kl": topk, "preset": preset,
                               "group_size": "-" if method == "kd" else group or s.scope_group, "seed": seed,
                               "run_dir": str(run)}
        config = method_config(method, topk, student, teacher, task, run, s, seed)
        elapsed = f"[{(time.monotonic() - wall_start) / 60:6.1f} min]"
        timing = run / "experiment_run.json"
        if finished(run, method, config, s.scope_steps):
            say(f"{elapsed} {index}/{total} {label}: done before, skipped")
            row["seconds"] = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
        else:
            say(f"{elapsed} {index}/{total} {label}")
            started = time.monotonic()
            try:
                run.mkdir(parents=True, exist_ok=True)
                (run / "metrics.jsonl").unlink(missing_ok=True)
                (run / "heldout.json").unlink(missing_ok=True)
                if method == "kd":
                    run_kd(student, teacher, task, run, s, seed, label)
                else:
                    demo.run_training(config, run / "config_in.yaml", label, s.scope_steps, run / "train.log",
                                      echo=say, every=max(1, s.eval_every))
                if not finished(run, method, None, s.scope_steps):
                    raise RuntimeError(f"{variant} ended without a held-out evaluation at step {s.scope_steps}; "
                                       f"log: {run / 'train.log'}")
            except Exception as exc:  # a failed run is a table entry, not the end of the experiment
                say(f"  {label} failed: {exc}")
                row["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            row["seconds"] = round(time.monotonic() - started, 1)
            timing.write_text(json.dumps({"seconds": row["seconds"]}) + "\n")
        if "error" not in row:
            row.update(run_result(run, method))
            say(f"  {label}: held-out Avg@1 {row['before']:.1%} -> {row['after']:.1%}")
        return row

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        rows.sort(key=lambda r: order[(r["variant"], r["seed"])])  # results.json in task order
        report(final=False)

    run_pool([(i + 1, *t) for i, t in enumerate(tasks)], args.jobs, lambda t: one_run(*t), record)
    report(final=True)
    print(f"{out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_by_step.png'} "
          f"({(time.monotonic() - wall_start) / 60:.1f} min)")
    return 0


def _topk_effect_table(rows: Sequence[Mapping[str, Any]], with_topk: Sequence[str],
                       labels: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """Per KL-path method: (with top-k) - (without), per seed, its mean and 95% t-interval."""
    lines = ["| method | seeds paired | Avg@1 with top-k minus without [95% CI] |", "|---|---|---|"]
    summary: dict[str, Any] = {}
    for variant in with_topk:
        base = variant[: -len(TOPK_SUFFIX)]
        on = {sd: float(r["after"]) for sd, r in successful(rows, variant).items()}
        off = {sd: float(r["after"]) for sd, r in successful(rows, base).items()}
        diffs = paired_differences(on, off)
        iv = t_interval(list(diffs.values())).to_json() if diffs else None
        summary[base] = None if iv is None else {**iv, "seeds": list(diffs)}
        lines.append(f"| {labels.get(base, base)} | {len(diffs)} | {_pp(iv)} |")
    return "\n".join(lines) + "\n", summary


if __name__ == "__main__":
    raise SystemExit(main())
