"""Export a scope-megatron / megatron-core checkpoint as an HF model directory.

    python -m checkpoints_tools.megatron_to_hf --ckpt CKPT_DIR --out HF_DIR

Writes safetensors (``model.safetensors``, or shards + ``model.safetensors.index.json`` past
``--max-shard-gb``), the stored config.json and tokenizer files. transformers'
``AutoModelForCausalLM.from_pretrained(HF_DIR)`` loads it; HF -> Megatron -> HF is
bit-identical. Vocabulary padding is stripped. Under torchrun with --tp/--pp each rank loads
only its shard; rank 0 writes, one tensor in memory at a time beyond the open shard.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ._cli import add_layout_args, build_for_conversion, reading_input, run_tool

logger = logging.getLogger("checkpoints_tools.megatron_to_hf")


def export(args: argparse.Namespace) -> dict:
    from scope_megatron.model import checkpoint
    from scope_megatron.model.arch import check_parallel_layout
    from scope_megatron.model.builder import resolve_dtype
    from scope_megatron.parallel import init_parallel

    start = time.time()
    with reading_input():
        arch, meta = checkpoint.read_meta(args.ckpt)
        check_parallel_layout(arch, args.tp, args.pp)
    if Path(args.out).exists():
        raise checkpoint.OutputExistsError(f"output directory {args.out} already exists; choose another --out")
    with reading_input():  # the world size torchrun gave must fit --tp x --pp
        init_parallel(args.tp, args.pp)
    model = build_for_conversion(arch, resolve_dtype(meta["dtype"]))
    checkpoint.load_model(model, args.ckpt)
    files = checkpoint.export_hf_dir(model, arch, args.out, Path(args.ckpt) / checkpoint.HF_SUBDIR,
                                     max_shard_bytes=int(args.max_shard_gb * 1024**3))
    return {"out": str(Path(args.out).resolve()), "files": files, "seconds": round(time.time() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.megatron_to_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="scope-megatron checkpoint directory")
    parser.add_argument("--out", required=True, help="HF directory to create (must not exist)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GB)")
    add_layout_args(parser)
    return run_tool("megatron_to_hf", export, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
