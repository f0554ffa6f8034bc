"""Convert an HF checkpoint (safetensors) into a scope-megatron / megatron-core dist checkpoint.

    python -m checkpoints_tools.hf_to_megatron --hf HF_DIR --out CKPT_DIR
    torchrun --nproc_per_node=8 -m checkpoints_tools.hf_to_megatron --hf HF_DIR --out CKPT_DIR --tp 8

The checkpoint loads under any TP / PP layout. Memory per rank: this rank's share of the model
(parameters x bytes / (TP x PP)) plus the largest single HF tensor (e.g. the embedding); tensors
are read one at a time from memory-mapped safetensors. A 70B bf16 model needs ~145 GB of RAM in
one process, ~18 GB per rank with --tp 8. Output is written to CKPT_DIR.partial and renamed
when complete.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from scope_megatron.model.arch import arch_from_hf_config, check_parallel_layout, load_hf_config
from scope_megatron.model.builder import DTYPES, resolve_dtype

from ._cli import add_layout_args, build_for_conversion, reading_input, run_tool

logger = logging.getLogger("checkpoints_tools.hf_to_megatron")


def convert(args: argparse.Namespace) -> dict:
    from scope_megatron.model import checkpoint
    from scope_megatron.model.hf_io import HFWeightReader, load_hf_into_model
    from scope_megatron.parallel import init_parallel

    start = time.time()
    with reading_input():
        arch = arch_from_hf_config(load_hf_config(args.hf))
        check_parallel_layout(arch, args.tp, args.pp)
    if Path(args.out).exists():
        raise checkpoint.OutputExistsError(f"output directory {args.out} already exists; choose another --out")
    reader = HFWeightReader(args.hf, arch)
    reader.check_complete()
    dtype = resolve_dtype(args.dtype, auto=reader.dtype() if args.dtype == "auto" else None)  # reads one tensor
    with reading_input():  # the world size torchrun gave must fit --tp x --pp
        init_parallel(args.tp, args.pp)
    logger.info("converting %s (%s, %.1fM params, %s) at TP=%d PP=%d", args.hf, arch.model_type,
                arch.num_parameters / 1e6, dtype, args.tp, args.pp)
    model = build_for_conversion(arch, dtype)
    load_hf_into_model(model, arch, reader)
    with checkpoint.atomic_output_dir(args.out) as tmp:
        checkpoint.save_model(model, tmp)
        checkpoint.write_meta(tmp, arch, args.hf, dtype)
    return {"out": str(Path(args.out).resolve()), "model_type": arch.model_type,
            "num_parameters": arch.num_parameters, "dtype": str(dtype).removeprefix("torch."),
            "seconds": round(time.time() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.hf_to_megatron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint directory to create (must not exist)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="storage dtype (default: that of the HF weights)")
    add_layout_args(parser)
    return run_tool("hf_to_megatron", convert, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
