"""The production path one GPU allows, checked in a few minutes: one JSON line per check.

    python bench/gpu_checks.py [--out DIR] [--small]        (bench/gpu_checks.sh runs it)

Checks, each printed as ``{"check": NAME, "ok": true|false, ...figures}``:

1. ``env``: torch / megatron-core versions, the device, ``device_check.check_device()``, and whether
   megatron-core can use Transformer Engine (its ``HAVE_TE``, the TE version or import error).
2. ``parity_bf16`` / ``parity_fp32``: HF transformers vs the megatron student on the same random
   weights (``checkpoints_tools.hf_to_megatron`` then ``checkpoints_tools.verify --impl auto``: TE when
   megatron can use it, so a checkpoint converted without TE is loaded into TE layers). Tolerances
   on max |logit difference| over the true vocabulary: bf16 ``--bf16-tol`` (default 0.5: random
   weights, logits of std ~0.6, 28 layers rounded differently by the two implementations; the
   argmax agreement is reported too), fp32 ``--fp32-tol`` (default 1e-3).
3. ``scope_train``: ``python -m scope_megatron.train`` with the tiny config (embedded student and
   teacher engines on the training GPU, disk weight sync), 2 steps with a checkpoint per step.
4. ``resume``: the same run resumed from its latest checkpoint for a third step: the step counter
   continues (metrics for steps 1, 2, 3, "resumed from" logged), losses finite.
5. ``recompute``: one step with ``model.recompute=full`` (megatron's full recompute; on GPU without
   TE, the local layers); its step-1 loss is compared with ``scope_train``'s (same seed and data).
6. ``loss_compile``: the torch.compile'd log-prob kernels against the eager ones (values, entropy and
   gradient, fp32 math from bf16 logits, tolerance 1e-3) and ``bench/loss.py`` timing both.
7. ``knobs``: ``bench/train_step.py`` (megatron only, Qwen3-0.6B shape at 4096 tokens; ``--small``: the
   tiny model at 128) once per model knob, each against the baseline (fusions auto, no recompute):
   fusions off, recompute selective / full, packed THD rows (8 sequences) with fusions auto and off
   (fused RoPE's THD kernel), and, with two or more devices (or on CPU), TP2 under torchrun with
   sequence parallelism off / on. Each variant's tokens/s, peak memory and resolved settings; ok
   when every variant ran and its first-step loss equals its baseline's (same weights and batch;
   relative tolerance 2e-2 in bf16, 1e-5 in fp32).

``--small`` (SMALL=1 in the shell script) shrinks every size for a CPU dry run; there the devices
are ``cpu``. Logs go to ``--out`` (default ``$OUT`` or /tmp/gpu_checks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN3_06B_SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=40960)


RECORDS: list[dict] = []


def emit(check: str, ok: bool, **figures) -> dict:
    record = {"check": check, "ok": bool(ok), **figures}
    RECORDS.append(record)
    print(json.dumps(record, default=str), flush=True)
    return record


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run(cmd: list[str], log: Path, timeout: float) -> tuple[int, str, float]:
    """Run ``cmd``; stderr goes to ``log`` (appended); returns (exit code, stdout, seconds)."""
    start = time.time()
    with open(log, "a") as err:
        err.write(f"\n$ {' '.join(cmd)}\n")
        err.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), timeout
    return proc.returncode, proc.stdout, round(time.time() - start, 1)


def _last_json(stdout: str) -> dict | None:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _tail(log: Path, n: int = 3) -> list[str]:
    lines = [line for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return lines[-n:]


def check_env() -> dict:
    import torch

    figures: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "cuda_available": torch.cuda.is_available(),
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        from scope_megatron.device_check import check_device

        figures["device_check"] = check_device()
    except Exception as err:
        figures["device_check"] = f"{type(err).__name__}: {err}"
    try:
        import megatron.core

        from scope_megatron.model.builder import transformer_engine_status

        figures["megatron_core"] = megatron.core.__version__
        te = transformer_engine_status()
        figures.update(have_te=te.usable, te_installed=te.installed, te_version=te.version, te_error=te.error)
    except Exception as err:
        figures["megatron_error"] = f"{type(err).__name__}: {err}"
    ok = "megatron_error" not in figures and figures["device_check"] in ("cuda", "cpu")
    return emit("env", ok, **figures)


def check_parity(work: Path, out: Path, small: bool, bf16_tol: float, fp32_tol: float) -> None:
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    hf, ckpt, log = work / "parity_hf", work / "parity_ckpt", out / "parity.log"
    save_tiny_hf_model(hf, "qwen3", seed=3, dtype="bfloat16", **({} if small else QWEN3_06B_SHAPE))
    code, stdout, secs = run([sys.executable, "-m", "checkpoints_tools.hf_to_megatron", "--hf", str(hf), "--out",
                              str(ckpt)], log, 300)
    if code != 0:
        for dtype in ("bf16", "fp32"):
            emit(f"parity_{dtype}", False, error=f"conversion exit {code}", log_tail=_tail(log))
        return
    lengths = "16,64" if small else "128,2048"
    for name, dtype, tol in (("parity_bf16", "bfloat16", bf16_tol), ("parity_fp32", "float32", fp32_tol)):
        code, stdout, secs = run([sys.executable, "-m", "checkpoints_tools.verify", "--hf", str(hf), "--ckpt",
                                  str(ckpt), "--dtype", dtype, "--impl", "auto", "--tol", str(tol), "--lengths",
                                  lengths], log, 300)
        result = _last_json(stdout) or {}
        keep = ("max_abs_logit_diff", "max_abs_logprob_diff", "argmax_agreement", "tol", "layer_impl", "lengths")
        emit(name, code == 0 and bool(result.get("ok")), seconds=secs, exit_code=code,
             **{k: result[k] for k in keep if k in result}, **({} if result else {"log_tail": _tail(log)}))


def _metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    return {r["step"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_training(work: Path, out: Path, small: bool) -> None:
    import torch

    from scope_megatron.examples.tiny import prepare

    assets = prepare(work / "tiny")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    common = [f"model.student={assets['student']}", f"teacher.model={assets['teacher']}",
              f"data.paths=[{assets['prompts']}]", f"rollout.embedded_device={device}",
              f"teacher.embedded_device={device}", "sync.transport=disk", "sync.verify=true",
              "checkpoint.every=1", "checkpoint.keep_last=0"]
    train = [sys.executable, "-m", "scope_megatron.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml")]
    timeout = 420 if small else 180
    log = out / "train.log"

    run_dir = work / "scope_run"
    code, _, secs = run([*train, f"run_dir={run_dir}", "steps=2", *common], log, timeout)
    metrics = _metrics(run_dir)
    losses = [metrics[s].get("loss/total") for s in sorted(metrics)]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    emit("scope_train", code == 0 and sorted(metrics) == [1, 2] and _finite(losses) and "step_00000002" in ckpts,
         seconds=secs, exit_code=code, steps=sorted(metrics), loss_total=losses, checkpoints=ckpts,
         sync_probe=(run_dir / "sync_probe.jsonl").is_file(), **({} if code == 0 else {"log_tail": _tail(log)}))

    before = log.read_text() if log.is_file() else ""
    code, _, secs = run([*train, f"run_dir={run_dir}", "steps=3", "checkpoint.resume=latest", *common], log, timeout)
    resumed_log = (log.read_text() if log.is_file() else "")[len(before):]
    after = _metrics(run_dir)
    emit("resume", code == 0 and sorted(after) == [1, 2, 3] and "resumed from" in resumed_log
         and _finite([after[3].get("loss/total")] if 3 in after else [None])
         and [after[s].get("loss/total") for s in (1, 2)] == losses,
         seconds=secs, exit_code=code, steps=sorted(after), loss_step3=after.get(3, {}).get("loss/total"),
         step2_checkpoint_reused="resumed from" in resumed_log, **({} if code == 0 else {"log_tail": _tail(log)}))

    rc_dir = work / "recompute_run"
    code, _, secs = run([*train, f"run_dir={rc_dir}", "steps=1", "model.recompute=full", *common], log, timeout)
    rc = _metrics(rc_dir)
    rc_loss = rc.get(1, {}).get("loss/total")
    ref_loss = metrics.get(1, {}).get("loss/total")
    emit("recompute", code == 0 and sorted(rc) == [1] and _finite([rc_loss]), seconds=secs, exit_code=code,
         loss_step1=rc_loss, loss_step1_without_recompute=ref_loss,
         same_loss=None if rc_loss is None or ref_loss is None else math.isclose(rc_loss, ref_loss, rel_tol=1e-3),
         **({} if code == 0 else {"log_tail": _tail(log)}))


def check_loss_kernels(out: Path, small: bool) -> None:
    import torch

    from scope_megatron.objective import vocab_parallel_logprobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, vocab = (256, 4096) if small else (4096, 151936)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1, tokens, vocab, generator=gen, device=device).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (1, tokens), generator=gen, device=device)
    results = {}
    start = time.time()
    for fused in (False, True):
        x = logits.detach().clone().requires_grad_(True)
        try:
            lp, entropy = vocab_parallel_logprobs(x, targets, vocab_size=vocab, return_entropy=True, fused=fused)
            (lp.sum() + 0.1 * entropy.sum()).backward()
        except Exception as err:
            emit("loss_compile", False, error=f"fused={fused}: {type(err).__name__}: {str(err).splitlines()[0]}")
            return
        results[fused] = (lp.detach().float(), entropy.detach().float(), x.grad.float())
    diffs = [(a - b).abs().max().item() for a, b in zip(results[False], results[True])]
    compile_seconds = round(time.time() - start, 1)
    log = out / "loss.log"
    args = ["--tokens", str(tokens), "--vocab", str(vocab), "--variants", "scope_eager", "scope_fused",
            "--repeats", "2" if small else "5"]
    code, stdout, secs = run([sys.executable, str(REPO / "bench" / "loss.py"), *args], log, 300)
    timing = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            timing[record["variant"]] = record.get("time_ms", record.get("error"))
    emit("loss_compile", max(diffs) <= 1e-3 and code == 0 and all(isinstance(v, float) for v in timing.values()),
         tokens=tokens, vocab=vocab, device=device, max_diff_logprob=diffs[0], max_diff_entropy=diffs[1],
         max_diff_grad=diffs[2], tol=1e-3, first_calls_seconds=compile_seconds, bench_time_ms=timing)


KNOB_VARIANTS = {  # name: (train_step.py switches, baseline name or None)
    "baseline": ([], None),
    "fusions_off": (["--fusions", "off"], "baseline"),
    "recompute_selective": (["--recompute", "selective"], "baseline"),
    "recompute_full": (["--recompute", "full"], "baseline"),
    "packed": (["--packed", "8"], None),
    "packed_fusions_off": (["--packed", "8", "--fusions", "off"], "packed"),
    "tp2_sp_off": (["--tp", "2", "--sequence-parallel", "off"], None),
    "tp2_sp_on": (["--tp", "2", "--sequence-parallel", "on"], "tp2_sp_off"),
}


def check_knobs(out: Path, small: bool) -> None:
    import torch

    log = out / "knobs.log"
    model, seq = ("tiny", 128) if small else ("qwen3-0.6b", 4096)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 2  # CPU: two gloo ranks
    tol = 1e-5 if not torch.cuda.is_available() else 2e-2
    variants, errors = {}, {}
    for name, (switches, _) in KNOB_VARIANTS.items():
        tp2 = "--tp" in switches
        if tp2 and devices < 2:
            variants[name] = {"skipped": f"needs 2 devices, {devices} visible"}
            continue
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
            if tp2 else [sys.executable]
        code, stdout, secs = run([*launcher, str(REPO / "bench" / "train_step.py"), "--model", model, "--seq-len",
                                  str(seq), "--steps", "3", "--warmup", "1", "--frameworks", "megatron", *switches],
                                 log, 600)
        result = (_last_json(stdout) or {}).get("megatron")
        if code != 0 or not result or "error" in result:
            errors[name] = (result or {}).get("error") or f"exit {code}"
            variants[name] = {"error": errors[name], "log_tail": _tail(log)}
            continue
        keep = ("tokens_per_s", "step_time_s", "mfu", "peak_mem_gib", "peak_rss_gib", "first_loss", "fusions",
                "recompute", "sequence_parallel", "layer_impl")
        variants[name] = {k: result[k] for k in keep if k in result} | {"seconds": secs}
    mismatched = []
    for name, (_, base) in KNOB_VARIANTS.items():
        got, ref = variants[name].get("first_loss"), variants.get(base, {}).get("first_loss") if base else None
        if got is not None and ref is not None:
            variants[name]["same_loss_as"] = base
            if not math.isclose(got, ref, rel_tol=tol):
                mismatched.append(name)
    emit("knobs", not errors and not mismatched, model=model, seq_len=seq, loss_rel_tol=tol,
         loss_mismatch=mismatched, errors=errors, variants=variants)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_checks"))
    parser.add_argument("--small", action="store_true", default=os.environ.get("SMALL") == "1")
    parser.add_argument("--bf16-tol", type=float, default=0.5)
    parser.add_argument("--fp32-tol", type=float, default=1e-3)
    parser.add_argument("--only", nargs="+", default=None,
                        choices=["env", "parity", "training", "loss", "knobs"], help="run only these sections")
    args = parser.parse_args(argv)

    from scope_megatron.device_check import probe_transformer_engine
    from scope_megatron.logs import setup_logging

    probe_transformer_engine()  # before megatron-core is imported (a TE that does not import is hidden)
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = args.only or ["env", "parity", "training", "loss", "knobs"]
    with tempfile.TemporaryDirectory(prefix="gpu_checks_") as tmp:
        work = Path(tmp)
        start = time.time()
        if "env" in sections:
            check_env()
        if "parity" in sections:
            check_parity(work, out, args.small, args.bf16_tol, args.fp32_tol)
        if "training" in sections:
            check_training(work, out, args.small)
        if "loss" in sections:
            check_loss_kernels(out, args.small)
        if "knobs" in sections:
            check_knobs(out, args.small)
        failed = [r["check"] for r in RECORDS if not r["ok"]]
        emit("total", not failed, seconds=round(time.time() - start, 1), small=args.small, failed=failed)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
