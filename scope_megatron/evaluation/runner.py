"""Sample, score, record and summarise: the engine of ``scope-megatron eval`` and of in-training eval.

Per problem: the prompt is the paper's (``problem + " Put your final answer within \\boxed{}."``
through the student tokenizer's chat template, :data:`~scope_megatron.rollout.data.PAPER_FORMAT`);
``n`` responses are sampled from an SGLang-protocol server (SGLang itself, or the embedded
engine) with the paper's evaluation settings (:class:`EvalSettings`); each response is scored
0/1 by :class:`~scope_megatron.rollout.rewards.MathRewardPool` (math-verify on the last
``\\boxed{}``; truncated responses and responses without an answer are wrong, as in training).

Records: one JSON line per finished problem in ``<out>/records/<benchmark>.jsonl`` (written and
flushed as each problem finishes), with every response's text, extracted answer, grader
status, finish reason and token count. A rerun with the same ``out`` directory and the same
sampling settings skips the problems already recorded (a half-written last line from an
interrupted run is dropped); different settings are refused (``overwrite=True`` starts over).
The metrics are computed from the records, so ``k`` and the estimator can be changed on a
rerun without sampling again.

Outputs: ``<out>/results.json`` (everything, fractions in [0, 1]) and ``<out>/results.md``
(a table laid out like the paper's Table 1, in percent, plus one row per benchmark per k).

For the trainer, :func:`evaluate` runs the same pipeline against a client and returns flat
scalars ``{"eval/<benchmark>/avg@k": .., "eval/<benchmark>/pass@k": .., "eval/mean/...": ..}``
ready for TensorBoard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..rollout.client import BackgroundLoop, GenerationResult, SGLangClient, SGLangError, first_leaf
from ..rollout.data import PAPER_FORMAT, PromptFormat, format_prompt
from ..rollout.protocol import ProtocolError, SamplingParams
from ..rollout.rewards import STATUSES, MathRewardPool, RewardResult, last_boxed_content
from .benchmarks import Benchmark, Problem, load_benchmarks
from .metrics import (BOOTSTRAP_DRAWS, BOOTSTRAP_SEED, ESTIMATOR_DESCRIPTIONS, ESTIMATORS, BenchmarkScore,
                      benchmark_metrics, check_ks, mean_over_benchmarks, mean_standard_errors)

logger = logging.getLogger(__name__)

RECORDS_DIR = "records"
CONFIG_FILE = "eval_config.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# custom grader for non-math tasks (the demo): (response text, gold answer, truncated) -> 0/1 score
RewardFn = Callable[[str, str, bool], float]


class EvalError(RuntimeError):
    """An evaluation cannot run or resume as asked (the message says why and what to do)."""


class EvalServerError(EvalError):
    """The server failed or refused a request during sampling (records so far are kept)."""


@dataclass
class EvalSettings:
    """What is sampled and how it is summarised. Defaults are the paper's evaluation settings
    (Table 4: temperature 0.6, top-p 0.95, top-k 20, up to 32,768 new tokens, 32 samples);
    the paper used repetition penalty 1.08 for its Qwen3-1.7B student and 1.0 otherwise."""

    n: int = 32
    ks: tuple[int, ...] = (1, 8, 32)
    estimator: str = "unbiased"
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    min_p: float = 0.0
    max_new_tokens: int = 32768
    repetition_penalty: float = 1.0
    seed: int | None = None              # per-sample sampling seeds derived from it (reproducible runs)
    bootstrap_draws: int = BOOTSTRAP_DRAWS
    bootstrap_seed: int = BOOTSTRAP_SEED
    prompt_format: PromptFormat = PAPER_FORMAT

    def __post_init__(self) -> None:
        self.ks = tuple(sorted(set(int(k) for k in self.ks)))
        if self.n < 1:
            raise EvalError(f"n must be at least 1, got {self.n}")
        if self.estimator not in ESTIMATORS:
            raise EvalError(f"unknown estimator {self.estimator!r}; choose from {', '.join(ESTIMATORS)}")
        check_ks(self.ks, self.n)
        try:
            self.sampling_params(None)  # validates the sampling values now
        except ProtocolError as exc:
            raise EvalError(f"bad sampling setting: {exc}") from None

    def sampling_params(self, eos_token_id: int | None) -> SamplingParams:
        """The ``sampling_params`` sent with every request (stop at the tokenizer's eos too)."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              stop_token_ids=None if eos_token_id is None else (int(eos_token_id),))

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the samples: a resume must match them exactly."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "min_p": self.min_p, "max_new_tokens": self.max_new_tokens,
                "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                "prompt_format": dataclasses.asdict(self.prompt_format)}

    def estimator_description(self) -> str:
        """One line naming the Pass@k estimator."""
        return ESTIMATOR_DESCRIPTIONS[self.estimator].format(draws=self.bootstrap_draws, seed=self.bootstrap_seed)


def default_ks(n: int) -> tuple[int, ...]:
    """The CLI's default k values: those of 1, 8, 32 that are <= n, and n itself."""
    return tuple(sorted({k for k in (1, 8, 32) if k <= n} | {n}))


def sample_seed(seed: int, benchmark: str, problem_id: str) -> int:
    """Base sampling seed of one problem (sample i uses base + i, through ``generate_group``).

    Keyed by benchmark and problem id, not by position, so a resumed or reordered run draws the
    same samples for a problem (the training controller keys by step and prompt instead:
    :func:`..trainer.controller.sampling_seed`); crc32, unlike ``hash()``, is stable across processes.
    """
    return zlib.crc32(f"{seed}/{benchmark}/{problem_id}".encode()) & 0x3FFFFFFF


# ------------------------------------------------------------------------------ records
class RecordStore:
    """``<dir>/<benchmark>.jsonl``: per-problem records, appended and flushed one at a time."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, Any] = {}

    def path(self, benchmark: str) -> Path:
        return self.dir / f"{benchmark}.jsonl"

    def load(self, benchmark: str) -> dict[str, dict[str, Any]]:
        """Records by problem id. A last line cut short by an interrupted run is removed from the file."""
        path = self.path(benchmark)
        if not path.exists():
            return {}
        data = path.read_bytes()
        records: dict[str, dict[str, Any]] = {}
        good_end = 0
        pos = 0
        line_no = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            line_no += 1
            chunk = data[pos:] if nl < 0 else data[pos:nl]
            try:
                obj = json.loads(chunk) if chunk.strip() else None
            except json.JSONDecodeError:
                obj = ...
            if obj is ... or nl < 0:
                if nl < 0 or data[nl + 1:].strip() == b"":
                    logger.warning("%s: dropping an incomplete last record (line %d) left by an interrupted run",
                                   path, line_no)
                    break
                raise EvalError(f"{path}:{line_no}: corrupt record (not valid JSON); fix or delete the file")
            if obj is not None:
                if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                    raise EvalError(f"{path}:{line_no}: not a problem record; fix or delete the file")
                records[obj["id"]] = obj
            pos = nl + 1
            good_end = pos
        if good_end < len(data):
            with path.open("r+b") as f:
                f.truncate(good_end)
        return records

    def append(self, benchmark: str, record: Mapping[str, Any]) -> None:
        """Write one record and flush it to disk."""
        f = self._files.get(benchmark)
        if f is None:
            f = self._files[benchmark] = self.path(benchmark).open("a", encoding="utf-8")
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def remove_all(self) -> None:
        """Delete every records file (``overwrite``)."""
        self.close()
        for p in self.dir.glob("*.jsonl"):
            p.unlink()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# ------------------------------------------------------------------------------ one run
@dataclass
class BenchmarkResult:
    """A benchmark's score plus counts from its records."""

    benchmark: Benchmark
    score: BenchmarkScore
    status_counts: dict[str, int]
    truncated_fraction: float
    mean_response_tokens: float
    num_resumed: int
    num_generated: int


@dataclass
class EvalResult:
    """What :func:`run_evaluation` returns (and writes to ``results.json``)."""

    settings: EvalSettings
    benchmarks: list[BenchmarkResult]
    mean: dict[str, float]
    model: str
    wall_time_s: float
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    mean_standard_errors: dict[str, float] = field(default_factory=dict)  # of ``mean``, by metric

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        """``{"<prefix>/<benchmark>/avg@k": .., ..., "<prefix>/mean/pass@k": ..}`` (fractions), and each
        metric's standard error over problems as ``.../avg@k_se``."""
        out: dict[str, float] = {}
        for b in self.benchmarks:
            for key, value in b.score.metrics.items():
                out[f"{prefix}/{b.benchmark.name}/{key}"] = value
            for key, value in b.score.standard_errors.items():
                out[f"{prefix}/{b.benchmark.name}/{key}_se"] = value
        for key, value in self.mean.items():
            out[f"{prefix}/mean/{key}"] = value
        for key, value in self.mean_standard_errors.items():
            out[f"{prefix}/mean/{key}_se"] = value
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` object."""
        s = self.settings
        return {
            "model": self.model,
            "estimator": s.estimator,
            "estimator_description": s.estimator_description(),
            "n": s.n,
            "ks": list(s.ks),
            "sampling": {k: v for k, v in s.fingerprint().items() if k not in ("n", "prompt_format")},
            "prompt_format": dataclasses.asdict(s.prompt_format),
            "bootstrap": {"draws": s.bootstrap_draws, "seed": s.bootstrap_seed} if s.estimator == "bootstrap" else None,
            "benchmarks": {
                b.benchmark.name: {
                    "display_name": b.benchmark.display_name,
                    "path": str(b.benchmark.path),
                    "num_problems": b.score.num_problems,
                    "num_samples": b.score.num_samples,
                    "metrics": b.score.metrics,
                    "standard_errors": b.score.standard_errors,
                    "status_counts": b.status_counts,
                    "truncated_fraction": b.truncated_fraction,
                    "mean_response_tokens": b.mean_response_tokens,
                    "problems_resumed": b.num_resumed,
                    "problems_generated": b.num_generated,
                } for b in self.benchmarks},
            "mean": self.mean,
            "mean_standard_errors": self.mean_standard_errors,
            "wall_time_s": self.wall_time_s,
            **self.extra,
        }


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def results_markdown(result: EvalResult) -> str:
    """The paper's Table 1 layout (one row, Avg@k / Pass@k per benchmark and their mean, in
    percent, k = the largest k) and a per-benchmark table with every k."""
    s = result.settings
    k = max(s.ks)
    names = [b.benchmark.display_name for b in result.benchmarks]
    lines = [f"# Evaluation of {result.model}", "",
             f"n = {s.n} samples per problem; temperature {s.temperature}, top-p {s.top_p}, top-k {s.top_k}, "
             f"max {s.max_new_tokens} new tokens, repetition penalty {s.repetition_penalty}.",
             f"Pass@k estimator: **{s.estimator}**: {s.estimator_description()}.",
             "Avg@k = mean accuracy per sample (c / n). Numbers in %.", "",
             f"## Avg@{k} (A) / Pass@{k} (P), as in the paper's Table 1", ""]
    header = ["Model"] + [f"{n} {m}" for n in names + ["Avg"] for m in ("A", "P")]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    row = [result.model]
    for b in result.benchmarks:
        row += [_pct(b.score.metrics[f"avg@{k}"]), _pct(b.score.metrics[f"pass@{k}"])]
    row += [_pct(result.mean[f"avg@{k}"]), _pct(result.mean[f"pass@{k}"])]
    lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Every k", ""]
    header = ["Benchmark", "problems"] + [f"Avg@{k}"] + [f"Pass@{kk}" for kk in s.ks] + ["truncated"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for b in result.benchmarks:
        m = b.score.metrics
        lines.append("| " + " | ".join([b.benchmark.display_name, str(b.score.num_problems), _pct(m[f"avg@{k}"])]
                                        + [_pct(m[f"pass@{kk}"]) for kk in s.ks]
                                        + [_pct(b.truncated_fraction)]) + " |")
    lines.append("| " + " | ".join(["Mean", str(sum(b.score.num_problems for b in result.benchmarks)),
                                    _pct(result.mean[f"avg@{k}"])]
                                   + [_pct(result.mean[f"pass@{kk}"]) for kk in s.ks] + [""]) + " |")
    return "\n".join(lines) + "\n"


class _Progress:
    """tqdm bar over problems (no-op when disabled)."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = None
        self.correct = 0
        self.samples = 0
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="problem", dynamic_ncols=True)

    def update(self, benchmark: str, num_correct: int, num_samples: int, count: int = 1) -> None:
        self.correct += num_correct
        self.samples += num_samples
        if self.bar is not None:
            self.bar.set_postfix_str(f"{benchmark} acc={self.correct / max(1, self.samples):.3f}", refresh=False)
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _problem_matches(record: Mapping[str, Any], problem: Problem, n: int) -> bool:
    return (record.get("problem") == problem.problem and record.get("answer") == problem.answer
            and record.get("n") == n and isinstance(record.get("correct"), list) and len(record["correct"]) == n)


def _summarise(benchmark: Benchmark, records: Sequence[Mapping[str, Any]], settings: EvalSettings,
               num_resumed: int, num_generated: int) -> BenchmarkResult:
    correct = [[bool(x) for x in r["correct"]] for r in records]
    score = benchmark_metrics(correct, settings.ks, settings.estimator, benchmark.name, settings.bootstrap_draws,
                              settings.bootstrap_seed)
    counts = {s: 0 for s in STATUSES}
    tokens, truncated, total = 0, 0, 0
    for r in records:
        for smp in r.get("samples", []):
            counts[smp.get("status", "error")] = counts.get(smp.get("status", "error"), 0) + 1
            tokens += int(smp.get("num_tokens", 0))
            truncated += smp.get("finish_reason") == "length"
            total += 1
    return BenchmarkResult(benchmark=benchmark, score=score, status_counts=counts,
                           truncated_fraction=truncated / max(1, total), mean_response_tokens=tokens / max(1, total),
                           num_resumed=num_resumed, num_generated=num_generated)


async def _score(texts: list[str], gold: str, truncated: list[bool], reward_pool: MathRewardPool | None,
                 reward_fn: RewardFn | None) -> list[RewardResult]:
    if reward_fn is not None:
        out = []
        for text, trunc in zip(texts, truncated):
            value = float(reward_fn(text, gold, trunc))
            out.append(RewardResult(1.0 if value > 0.5 else 0.0, "correct" if value > 0.5 else "wrong",
                                    last_boxed_content(text)))
        return out
    assert reward_pool is not None
    return await reward_pool.score_async(texts, [gold] * len(texts), truncated)


async def run_evaluation_async(client: SGLangClient, benchmarks: Sequence[Benchmark], tokenizer: Any,
                               settings: EvalSettings, out_dir: str | Path | None = None, *,
                               reward_pool: MathRewardPool | None = None, reward_fn: RewardFn | None = None,
                               model_name: str = "model", overwrite: bool = False, progress: bool = True,
                               max_inflight_problems: int | None = None, write_results: bool = True) -> EvalResult:
    """Evaluate ``benchmarks`` against the server behind ``client`` (see the module docstring).

    ``out_dir`` None keeps the records in memory only (no resume). ``reward_pool`` None starts a
    two-worker :class:`MathRewardPool` for the call; ``reward_fn`` replaces math-verify.
    ``max_inflight_problems`` bounds the problems sampled at once (default: enough to keep
    ``client.max_concurrency`` requests busy), so finished records reach the disk steadily.
    """
    start = time.monotonic()
    if not benchmarks:
        raise EvalError("no benchmarks to evaluate")
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise EvalError(f"benchmark names must be unique, got {names}")
    store = RecordStore(Path(out_dir) / RECORDS_DIR) if out_dir is not None else None
    if store is not None:
        _check_config(Path(out_dir), settings, model_name, overwrite, store)
    eos = getattr(tokenizer, "eos_token_id", None)
    sampling = settings.sampling_params(eos)
    inflight = max_inflight_problems or max(1, -(-client.max_concurrency // settings.n)) + 1

    # what is already done
    todo: list[tuple[Benchmark, int, Problem]] = []
    done: dict[str, dict[str, dict[str, Any]]] = {}
    resumed: dict[str, int] = {}
    for b in benchmarks:
        existing = store.load(b.name) if store is not None else {}
        done[b.name] = {}
        for i, p in enumerate(b.problems):
            rec = existing.get(p.id)
            if rec is not None:
                if not _problem_matches(rec, p, settings.n):
                    assert store is not None
                    raise EvalError(f"{store.path(b.name)}: the record of problem {p.id!r} does not match "
                                    f"{b.path}:{p.line} (problem text, answer or n changed); use a new output "
                                    "directory or overwrite")
                done[b.name][p.id] = rec
            else:
                todo.append((b, i, p))
        resumed[b.name] = len(done[b.name])
    num_resumed = sum(resumed.values())
    if num_resumed:
        logger.info("resuming: %d problems already recorded, %d to go", num_resumed, len(todo))

    own_pool = reward_pool is None and reward_fn is None and bool(todo)
    pool = MathRewardPool(num_workers=2, timeout_s=10.0) if own_pool else reward_pool
    bar = _Progress(sum(len(b) for b in benchmarks), progress, desc=f"eval {model_name}")
    for b in benchmarks:
        if resumed[b.name]:
            c = sum(sum(bool(x) for x in r["correct"]) for r in done[b.name].values())
            bar.update(b.name, c, resumed[b.name] * settings.n, count=resumed[b.name])
    semaphore = asyncio.Semaphore(inflight)

    async def one(b: Benchmark, index: int, p: Problem) -> None:
        prompt = format_prompt(p.problem, tokenizer, settings.prompt_format)
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        params = sampling
        base_seed = None
        if settings.seed is not None:
            base_seed = sample_seed(settings.seed, b.name, p.id)
            params = sampling.replace(sampling_seed=base_seed)
        async with semaphore:
            try:
                results: list[GenerationResult] = await client.generate_group(prompt_ids, settings.n, params,
                                                                              return_logprob=False)
            except SGLangError as exc:
                kept = f"; finished problems are kept in {store.dir}, rerun to resume" if store is not None else ""
                raise EvalServerError(f"sampling {b.name} problem {p.id!r} ({b.path}:{p.line}, "
                                      f"{len(prompt_ids)} prompt tokens) failed: {exc}{kept}") from exc
        for r in results:
            if r.aborted:
                raise EvalServerError(f"the server at {client.base_url} aborted a request for {b.name}/{p.id} "
                                f"({r.finish_reason.message or r.finish_reason.raw}); was it paused?")
        texts = [r.text if r.text is not None else tokenizer.decode(r.output_ids, skip_special_tokens=True)
                 for r in results]
        truncated = [r.truncated for r in results]
        rewards = await _score(texts, p.answer, truncated, pool, reward_fn)
        correct = [rw.reward > 0.5 for rw in rewards]
        record = {
            "benchmark": b.name, "id": p.id, "index": index, "line": p.line, "source": p.source,
            "problem": p.problem, "answer": p.answer, "prompt": prompt, "num_prompt_tokens": len(prompt_ids),
            "n": settings.n, "num_correct": sum(correct), "correct": correct, "seed": base_seed,
            "samples": [{"text": t, "extracted": rw.extracted, "status": rw.status, "correct": ok,
                         "finish_reason": r.finish_reason.type, "num_tokens": len(r.output_ids)}
                        for t, rw, ok, r in zip(texts, rewards, correct, results)],
        }
        if store is not None:
            store.append(b.name, record)
        done[b.name][p.id] = record
        bar.update(b.name, sum(correct), settings.n)

    try:
        if todo:
            async with asyncio.TaskGroup() as tg:
                for b, i, p in todo:
                    tg.create_task(one(b, i, p))
    except BaseExceptionGroup as eg:
        raise first_leaf(eg) from None
    finally:
        bar.close()
        if store is not None:
            store.close()
        if own_pool and pool is not None:
            pool.close()

    results = []
    for b in benchmarks:
        records = [done[b.name][p.id] for p in b.problems]
        results.append(_summarise(b, records, settings, resumed[b.name], len(records) - resumed[b.name]))
    result = EvalResult(settings=settings, benchmarks=results,
                        mean=mean_over_benchmarks([r.score for r in results]),
                        mean_standard_errors=mean_standard_errors([r.score for r in results]), model=model_name,
                        wall_time_s=time.monotonic() - start, out_dir=Path(out_dir) if out_dir is not None else None)
    if out_dir is not None and write_results:
        out = Path(out_dir)
        (out / RESULTS_JSON).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        (out / RESULTS_MD).write_text(results_markdown(result))
    return result


def pending_problems(benchmarks: Sequence[Benchmark], out_dir: str | Path | None, n: int) -> int:
    """How many problems have no usable record in ``out_dir`` yet (all of them without one)."""
    total = sum(len(b) for b in benchmarks)
    if out_dir is None or not (Path(out_dir) / RECORDS_DIR).is_dir():
        return total
    store = RecordStore(Path(out_dir) / RECORDS_DIR)
    done = 0
    for b in benchmarks:
        existing = store.load(b.name)
        done += sum(1 for p in b.problems if p.id in existing and _problem_matches(existing[p.id], p, n))
    return total - done


def _check_config(out: Path, settings: EvalSettings, model_name: str, overwrite: bool, store: RecordStore) -> None:
    """Write ``eval_config.json``; on a rerun, refuse changed sampling settings (unless overwrite)."""
    path = out / CONFIG_FILE
    current = {"model": model_name, "settings": settings.fingerprint()}
    if path.exists() and not overwrite:
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EvalError(f"{path}: unreadable ({exc}); delete it or pass overwrite") from exc
        has_records = any(store.dir.glob("*.jsonl"))
        if has_records and previous.get("settings") != current["settings"]:
            old, new = previous.get("settings", {}), current["settings"]
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                             if old.get(k) != new.get(k))
            raise EvalError(f"{out} holds records sampled with other settings ({diff}); use a new output "
                            "directory, or --overwrite to discard them")
        if has_records and previous.get("model") != model_name:
            logger.warning("%s: records were made with model %r, this run uses %r; resuming anyway",
                           out, previous.get("model"), model_name)
    if overwrite:
        store.remove_all()
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2) + "\n")


def run_evaluation(client: SGLangClient, benchmarks: Sequence[Benchmark], tokenizer: Any, settings: EvalSettings,
                   out_dir: str | Path | None = None, *, loop: BackgroundLoop | None = None,
                   **kwargs: Any) -> EvalResult:
    """Synchronous :func:`run_evaluation_async` (on ``loop`` when given, else ``asyncio.run``)."""
    coro = run_evaluation_async(client, benchmarks, tokenizer, settings, out_dir, **kwargs)
    return loop.run(coro) if loop is not None else asyncio.run(coro)


# ------------------------------------------------------------------------------ for the trainer
def evaluate(client: SGLangClient, benchmarks: Sequence[Benchmark | str | Path], tokenizer: Any, *,
             n: int = 4, ks: Sequence[int] | None = None, settings: EvalSettings | None = None,
             reward_pool: MathRewardPool | None = None, reward_fn: RewardFn | None = None,
             loop: BackgroundLoop | None = None, out_dir: str | Path | None = None, prefix: str = "eval",
             limit: int | None = None, progress: bool = False) -> dict[str, float]:
    """Evaluate the model behind ``client`` and return scalars for the trainer's logger.

    Call it every N steps, after the weight sync, with the trainer's own client, tokenizer,
    :class:`BackgroundLoop` and :class:`MathRewardPool` (or ``reward_fn`` for a custom task)::

        scalars = evaluate(student_client, ["aime24.jsonl"], tokenizer, n=4, ks=[1, 4],
                           loop=trainer_loop, reward_pool=pool,
                           out_dir=run_dir / "eval" / f"step_{step}")
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)

    Returns ``{"<prefix>/<benchmark>/avg@k": .., "<prefix>/<benchmark>/pass@k": .., and the same
    under "<prefix>/mean/"}`` (fractions in [0, 1]), plus ``"<prefix>/<benchmark>/truncated"`` and
    ``"<prefix>/time_s"``. ``benchmarks`` are :class:`Benchmark` objects or file paths
    (``limit`` keeps the first N problems of each file). ``settings`` overrides everything;
    otherwise the paper's sampling with ``n`` samples and ``ks`` (default ``(1, n)``).
    ``out_dir`` keeps per-problem records (and makes the call resumable); None keeps none.
    """
    loaded_all: list[Benchmark] = []
    for b in benchmarks:
        loaded_all.extend([b] if isinstance(b, Benchmark) else load_benchmarks([b], limit=limit))
    if settings is None:
        settings = EvalSettings(n=n, ks=tuple(ks) if ks else tuple(sorted({1, n})))
    result = run_evaluation(client, loaded_all, tokenizer, settings, out_dir, loop=loop, reward_pool=reward_pool,
                            reward_fn=reward_fn, progress=progress, model_name=client.base_url)
    scalars = result.scalars(prefix)
    for b in result.benchmarks:
        scalars[f"{prefix}/{b.benchmark.name}/truncated"] = b.truncated_fraction
    scalars[f"{prefix}/time_s"] = result.wall_time_s
    return scalars
