"""Check that a converted checkpoint computes what the HF model computes, at a given TP / PP layout.

    torchrun --nproc_per_node=4 -m checkpoints_tools.verify --hf HF_DIR --ckpt CKPT_DIR --tp 2 --pp 2

Runs both models on the same random token ids (several lengths, batch > 1) through megatron's
real pipeline schedule, and prints one JSON line: ``max_abs_logit_diff`` (over the true
vocabulary), ``max_abs_logprob_diff``, ``argmax_agreement`` and the layout. Exits 1 when the
logit difference exceeds ``--tol`` (default 1e-4, meant for float32; bfloat16 needs ~1e-1).
Diagnostics only: this tool gathers full-vocabulary logits, which training never does.
"""

from __future__ import annotations

import argparse
import logging

import torch

from ._cli import add_layout_args, reading_input, run_tool

logger = logging.getLogger("checkpoints_tools.verify")


def _gather_logits(logits: torch.Tensor, true_vocab: int) -> torch.Tensor:
    """[b, s, V_padded/TP] on each TP rank -> [b, s, V_true] float32 on CPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits[..., :true_vocab].float().cpu()


def verify(args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from scope_megatron.batch import MicroBatch
    from scope_megatron.megatron_step import run_forward
    from scope_megatron.model import checkpoint
    from scope_megatron.model.arch import check_parallel_layout
    from scope_megatron.model.builder import build_gpt_model, resolve_dtype, resolve_layer_impl
    from scope_megatron.parallel import init_parallel

    with reading_input():
        arch, meta = checkpoint.read_meta(args.ckpt)
        check_parallel_layout(arch, args.tp, args.pp)
    dtype = resolve_dtype(args.dtype)
    with reading_input():  # the world size torchrun gave must fit --tp x --pp
        layout = init_parallel(args.tp, args.pp)
    with reading_input():  # --impl te on a machine without a working TE
        impl = resolve_layer_impl(args.impl)
    model = build_gpt_model(arch, params_dtype=dtype, impl=impl, perform_initialization=False)
    checkpoint.load_model(model, args.ckpt)
    model.eval()

    with reading_input():
        lengths = [min(int(x), arch.max_position_embeddings) for x in args.lengths.split(",")]
    gen = torch.Generator().manual_seed(args.seed)
    batches = [MicroBatch(torch.randint(0, arch.vocab_size, (args.batch, n), generator=gen)) for n in lengths]
    outputs = run_forward(model, batches, output_fn=lambda logits, mb: _gather_logits(logits, arch.vocab_size))

    result = None
    reporter = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
    if reporter:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype).to(device).eval()
        logit_diff = logprob_diff = 0.0
        agree = total = 0
        with torch.no_grad():
            for mb, mlogits in zip(batches, outputs):
                hlogits = hf_model(mb.tokens.to(device)).logits.float().cpu()
                logit_diff = max(logit_diff, (hlogits - mlogits).abs().max().item())
                logprob_diff = max(logprob_diff, (hlogits.log_softmax(-1) - mlogits.log_softmax(-1)).abs().max().item())
                agree += (hlogits.argmax(-1) == mlogits.argmax(-1)).sum().item()
                total += hlogits.shape[0] * hlogits.shape[1]
        result = {"max_abs_logit_diff": logit_diff, "max_abs_logprob_diff": logprob_diff,
                  "argmax_agreement": agree / total, "tol": args.tol, "tp": args.tp, "pp": args.pp,
                  "dp": layout.dp, "dtype": args.dtype, "layer_impl": impl, "lengths": lengths,
                  "batch": args.batch, "model_type": arch.model_type}
        result["ok"] = logit_diff <= args.tol
        result["exit_code"] = 0 if result["ok"] else 1
    holder = [result]
    src = dist.get_global_rank(ps.get_pipeline_model_parallel_group(), layout.pp - 1) if layout.pp > 1 else 0
    if layout.tp_rank == 0 and layout.dp_rank == 0 and layout.pp > 1:
        dist.broadcast_object_list(holder, src=src, group=ps.get_pipeline_model_parallel_group())
    if dist.get_rank() == 0 and holder[0]:
        logger.info("max |logit diff| %.3g (tol %.3g): %s", holder[0]["max_abs_logit_diff"], args.tol,
                    "OK" if holder[0]["ok"] else "FAIL")
    return holder[0] if dist.get_rank() == 0 else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun -m checkpoints_tools.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory")
    parser.add_argument("--ckpt", required=True, help="scope-megatron checkpoint converted from it")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed |logit difference|")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--impl", default="auto", choices=["auto", "te", "local", "local_sdpa"],
                        help="megatron layer implementation (auto: TE on GPU when installed, else local+SDPA)")
    parser.add_argument("--lengths", default="8,37,128", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_layout_args(parser)
    return run_tool("verify", verify, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
