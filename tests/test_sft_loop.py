"""Plain SFT through the training loop (``algorithm.preset: sft``).

Independent reference: the loss the loop reports at step 1 equals the token-mean NLL of the
solutions (eos included) given the chat-formatted prompts, computed with plain transformers on
the initial HF model; the loss then decreases on the same batch, and the exported model's
NLL (transformers again) is lower than the initial one. The run trains on packed micro-batches
(a token budget), the usual layout for SFT on long solutions.
"""

from __future__ import annotations

import json

import pytest
import torch

from scope_megatron.config import ConfigError, load_config
from tests.loop_utils import REPO, loop_env, read_metrics, tail

pytestmark = pytest.mark.timeout(240)

RECORDS = [
    {"id": "a", "problem": "12+34=?", "answer": "46", "solution": "2+4=6, 1+3+0=4, \\boxed{46}"},
    {"id": "b", "problem": "57+25=?", "answer": "82", "solution": "7+5=12, 5+2+1=8, \\boxed{82}"},
    {"id": "c", "problem": "90+11=?", "answer": "101", "solution": "0+1=1, 9+1+0=10, \\boxed{101}"},
]


def _reference_nll(hf_dir, records) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_megatron.rollout.data import PAPER_FORMAT, format_prompt

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt = tok(format_prompt(r["problem"], tok, PAPER_FORMAT), add_special_tokens=False).input_ids
            response = tok(r["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids = torch.tensor([prompt + response])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            p = len(prompt)
            total += -sum(logp[p - 1 + j, t].item() for j, t in enumerate(response))
            count += len(response)
    return total / count


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    import subprocess
    import sys

    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("sft")
    hf = save_tiny_hf_model(root / "init_hf", "qwen3", seed=3)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    run_dir = root / "run"
    steps = 5
    cmd = [sys.executable, "-m", "scope_megatron.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           f"run_dir={run_dir}", f"model.student={hf}", f"data.paths=[{data}]", "data.shuffle=false",
           "algorithm.preset=sft", f"rollout.prompts_per_step={len(RECORDS)}", "parallel.max_tokens_per_microbatch=256",
           f"steps={steps}", "optimizer.lr=1.0e-2", "optimizer.weight_decay=0.0", "checkpoint.every=0",
           f"checkpoint.export_hf_steps=[{steps}]", "teacher.model="]
    proc = subprocess.run(cmd, cwd=REPO, env=loop_env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, tail(proc)
    return hf, run_dir, steps, proc


def test_sft_step1_loss_equals_plain_torch_nll(sft_run):
    hf, run_dir, steps, _ = sft_run
    metrics = read_metrics(run_dir)
    assert sorted(metrics) == list(range(1, steps + 1))
    reference = _reference_nll(hf, RECORDS)
    assert metrics[1]["loss/total"] == pytest.approx(reference, abs=1e-4)
    assert metrics[1]["loss/mle"] == pytest.approx(reference, abs=1e-4)
    assert metrics[1]["loss/kl"] == 0.0
    n_tokens = sum(len(r["solution"]) + 1 for r in RECORDS)  # char-level tokenizer + eos
    assert metrics[1]["train/loss_tokens"] == n_tokens
    assert metrics[1]["train/micro_batches"] < len(RECORDS)  # at least one packed row holds two solutions
    assert metrics[1]["train/padding_fraction"] == 0.0


def test_sft_loss_decreases_and_export_learned(sft_run):
    hf, run_dir, steps, proc = sft_run
    metrics = read_metrics(run_dir)
    losses = [metrics[s]["loss/total"] for s in range(1, steps + 1)]
    assert losses[-1] < losses[0] - 0.5, losses
    exported = run_dir / "hf" / f"step_{steps:08d}"
    after = _reference_nll(exported, RECORDS)
    assert after < _reference_nll(hf, RECORDS) - 0.5
    # no engines were started for SFT
    assert not (run_dir / "engines").exists()
    assert "sync_probe" not in proc.stderr


def test_sft_config_checks(tmp_path):
    base = ["run_dir=x", "model.student=m", "data.paths=[d.jsonl]", "algorithm.preset=sft"]
    config = load_config(None, base)  # no teacher needed
    assert config.supervised and not config.teacher.model
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(None, base + ["eval.every=5", "eval.benchmarks=[b.jsonl]"])
    with pytest.raises(ConfigError, match="teacher.model"):
        load_config(None, base[:-1] + ["algorithm.preset=scope"])
    with pytest.raises(ConfigError, match="eval.benchmarks"):
        load_config(None, base[:-1] + ["algorithm.preset=scope", "teacher.model=t", "eval.every=5"])


def test_sft_without_solutions_fails_with_named_field(tmp_path):
    import subprocess
    import sys

    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    hf = save_tiny_hf_model(tmp_path / "hf", "qwen3", seed=0)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "x", "problem": "1+1=?", "answer": "2"}) + "\n")
    cmd = [sys.executable, "-m", "scope_megatron.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
           f"run_dir={tmp_path / 'run'}", f"model.student={hf}", f"data.paths=[{data}]", "algorithm.preset=sft",
           "steps=1", "teacher.model="]
    proc = subprocess.run(cmd, cwd=REPO, env=loop_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]  # a configuration error: one line, no traceback
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "'solution'" in proc.stderr and "config field 'data.solution_key'" in proc.stderr
