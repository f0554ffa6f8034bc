"""The foundation demo (``scope-megatron parity-demo``): conversion, parity and training in about a minute.

1. builds a tiny Qwen3-architecture HF model and tokenizer (random weights; nothing downloaded);
2. converts it with ``checkpoints_tools.hf_to_megatron``;
3. checks Megatron-vs-HF logits with ``checkpoints_tools.verify`` at TP=1 and at TP=2 (torchrun, gloo);
4. trains the Megatron student for a few steps on a synthetic, verifiable arithmetic task
   (``12+7=\\boxed{19}``) through megatron-core's schedule, DDP and distributed optimizer;
5. exports the trained student with ``checkpoints_tools.megatron_to_hf``, loads it with
   transformers and shows its loss on held-out problems before and after.

Everything lands in ``runs/parity-demo-<time>/`` and the paths are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import time
from pathlib import Path

logger = logging.getLogger("scope_megatron.examples.parity_demo")


def arithmetic_examples(n: int, seed: int) -> list[str]:
    """Synthetic problems with verifiable answers, in the format SCOPE rewards: ``a+b=\\boxed{c}``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"{a}+{b}=\\boxed{{{a + b}}}")
    return out


def _run_tool(module: str, *args: str, nproc: int = 1) -> dict:
    from checkpoints_tools._cli import tool_command

    cmd, env = tool_command(module, *args, nproc=nproc)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"demo: {module} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _heldout_loss(hf_dir: Path, examples: list[str]) -> float:
    """Mean next-token NLL of the answer part (after '=') under the HF model, computed by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in examples:
            ids = torch.tensor([tok(text).input_ids])
            start = text.index("=") + 1
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            total += -logp[start - 1:].sum().item()
            count += ids.shape[1] - start
    return total / count


def _train(ckpt: Path, out: Path, steps: int, lr: float) -> list[float]:
    """SFT steps on the arithmetic task through megatron-core (one rank); save to ``out``."""
    import torch
    from tqdm import tqdm

    from scope_megatron.batch import MicroBatch, TokenFields
    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.objective import vocab_parallel_logprobs
    from scope_megatron.parallel import destroy_parallel, init_parallel
    from scope_megatron.examples.tiny_models import make_tiny_tokenizer

    init_parallel(1, 1, seed=0)
    arch, _ = checkpoint.read_meta(ckpt)
    model = build_gpt_model(arch, perform_initialization=False)
    checkpoint.load_model(model, ckpt)
    ddp_model, optimizer, scheduler = wrap_for_training(model, lr=lr, weight_decay=0.0, clip_grad=1.0)
    tok = make_tiny_tokenizer()
    losses = []
    bar = tqdm(range(steps), desc="train (megatron)", unit="step")
    for step in bar:
        texts = arithmetic_examples(16, seed=1000 + step)
        rows = [tok(t).input_ids for t in texts]
        longest = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest - 1)
        for i, (r, t) in enumerate(zip(rows, texts)):
            tokens[i, :len(r)] = torch.tensor(r)
            mask[i, t.index("=") : len(r) - 1] = 1  # loss on the answer tokens only
        total = int(mask.sum())

        def loss_fn(logits, mb):
            logprobs = vocab_parallel_logprobs(logits, mb.fields.targets, vocab_size=arch.vocab_size)
            return -(logprobs * mb.fields.response_mask).sum() / total, {}

        mb = MicroBatch(tokens[:, :-1], TokenFields(targets=tokens[:, 1:], response_mask=mask), total)
        result = train_step(ddp_model, optimizer, scheduler, [mb], loss_fn)
        losses.append(result.loss)
        bar.set_postfix(loss=f"{result.loss:.3f}", grad_norm=f"{result.grad_norm:.2f}")
    with checkpoint.atomic_output_dir(out) as tmp:
        checkpoint.save_model(model, tmp)
        checkpoint.write_meta(tmp, arch, ckpt / checkpoint.HF_SUBDIR, torch.float32)
    destroy_parallel()
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scope-megatron parity-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="where to write (default: runs/parity-demo-<time>)")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    from scope_megatron.logs import setup_logging
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    setup_logging()
    start = time.time()
    run = Path(args.run_dir or f"runs/parity-demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run.mkdir(parents=True, exist_ok=False)
    print(f"[1/5] tiny Qwen3-architecture model -> {run / 'hf'}")
    save_tiny_hf_model(run / "hf", "qwen3", seed=0, hidden_size=128, intermediate_size=256, num_hidden_layers=2)

    print("[2/5] convert HF -> Megatron (checkpoints_tools.hf_to_megatron)")
    info = _run_tool("checkpoints_tools.hf_to_megatron", "--hf", str(run / "hf"), "--out", str(run / "megatron"))
    print(f"      {info['num_parameters']:,} parameters, {info['dtype']}, {info['seconds']} s")

    print("[3/5] Megatron vs HF logits (checkpoints_tools.verify)")
    parity = {}
    for tp in (1, 2):
        res = _run_tool("checkpoints_tools.verify", "--hf", str(run / "hf"), "--ckpt", str(run / "megatron"),
                        "--tp", str(tp), nproc=tp)
        parity[f"tp{tp}"] = res["max_abs_logit_diff"]
        print(f"      TP={tp}: max |logit diff| = {res['max_abs_logit_diff']:.2e} (tol {res['tol']:.0e}) "
              f"{'OK' if res['ok'] else 'FAIL'}")

    print(f"[4/5] train the Megatron student {args.steps} steps on a synthetic arithmetic task")
    heldout = arithmetic_examples(64, seed=7)
    before = _heldout_loss(run / "hf", heldout)
    losses = _train(run / "megatron", run / "megatron-trained", args.steps, args.lr)

    print("[5/5] export Megatron -> HF (checkpoints_tools.megatron_to_hf) and evaluate with transformers")
    _run_tool("checkpoints_tools.megatron_to_hf", "--ckpt", str(run / "megatron-trained"), "--out",
              str(run / "hf-trained"))
    after = _heldout_loss(run / "hf-trained", heldout)
    summary = {"run_dir": str(run), "parity_max_abs_logit_diff": parity, "train_loss_first": losses[0],
               "train_loss_last": losses[-1], "heldout_answer_nll_before": before, "heldout_answer_nll_after": after,
               "seconds": round(time.time() - start, 1)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print("| held-out answer NLL (nats/token) | value |")
    print("|---|---|")
    print(f"| random init (HF) | {before:.3f} |")
    print(f"| after {args.steps} Megatron steps, exported to HF | {after:.3f} |")
    print(f"\ntrain loss {losses[0]:.3f} -> {losses[-1]:.3f}; parity TP1 {parity['tp1']:.1e}, TP2 {parity['tp2']:.1e}; "
          f"{summary['seconds']} s")
    print(f"outputs: {run}/ (hf, megatron, megatron-trained, hf-trained, summary.json)")
    ok = after < before and all(v < 1e-4 for v in parity.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
