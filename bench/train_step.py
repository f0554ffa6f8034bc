"""Training-step throughput of the Megatron student vs HF transformers on the same device and shape.

    python bench/train_step.py --model qwen3-0.6b --seq-len 4096            # GPU, bf16
    python bench/train_step.py --model path/to/config.json --seq-len 4096
    python bench/train_step.py --model tiny --seq-len 128 --steps 3         # CPU smoke run
    python bench/train_step.py --recompute full --fusions off                # one knob setting
    torchrun --nproc_per_node=2 bench/train_step.py --tp 2 --sequence-parallel on --frameworks megatron

Prints one JSON line: for each framework the median step time, tokens/s, MFU (GPU only: model
FLOPs / (step time x peak bf16 FLOP/s of the device)) and peak memory. Weights are random; the
loss is the token-mean NLL of random targets; the optimizer is AdamW (Megatron: fp32 main params
and distributed optimizer; HF: torch AdamW on the model's own dtype, as a plain HF loop does).

The model knobs (``scope_megatron.model.builder.ModelOptions``) are switches: ``--fusions``
(auto / on / off: all four of apply_rope_fusion, bias_activation_fusion, bias_dropout_fusion,
gradient_accumulation_fusion; ``on`` fails where a kernel is missing), ``--recompute`` (none /
selective / full, with ``--recompute-method`` / ``--recompute-num-layers``), ``--tp`` with
``--sequence-parallel`` (under torchrun, one process per TP rank; rank 0 prints), ``--packed N``
(the micro-batch as one packed THD row of N equal sequences: the path that fused RoPE speeds up).
The JSON reports the resolved settings and the first step's loss (the same weights and batch for
every setting: fusions, recompute and SP must not change it beyond rounding).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {  # shapes of public configs (config.json values)
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}
# dense bf16 peak FLOP/s by device name fragment
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}


def hf_config_dict(model: str) -> dict:
    if model == "tiny":
        from scope_megatron.examples.tiny_models import tiny_hf_config

        return tiny_hf_config("qwen3").to_dict()
    if model in PRESETS:
        return {"model_type": "qwen3", "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "max_position_embeddings": 40960, "hidden_act": "silu", "torch_dtype": "bfloat16", **PRESETS[model]}
    return json.loads(Path(model).read_text())


def flops_per_token(arch, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (+ LM head) + causal attention scores/context."""
    h, d, layers = arch.hidden_size, arch.head_dim, arch.num_layers
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size
    dense = layers * per_layer + arch.vocab_size * h
    attention = layers * 6 * seq_len * q  # 12 s q per token, halved by the causal mask
    return 6 * dense + attention


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(step, steps: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _summary(times: list[float], tokens: int, fpt: float) -> dict:
    step = statistics.median(times)
    peak = peak_flops()
    out = {"step_time_s": round(step, 4), "tokens_per_s": round(tokens / step, 1),
           "mfu": round(fpt * tokens / step / peak, 4) if peak else None}
    if torch.cuda.is_available():
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        import resource

        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def bench_megatron(cfg: dict, args, dtype: torch.dtype) -> dict:
    from scope_megatron.batch import MicroBatch, TokenFields
    from scope_megatron.megatron_step import train_step, wrap_for_training
    from scope_megatron.model.arch import arch_from_hf_config
    from scope_megatron.model.builder import FUSIONS, ModelOptions, build_gpt_model, resolve_layer_impl, \
        sequence_length_multiple
    from scope_megatron.objective import vocab_parallel_logprobs
    from scope_megatron.parallel import destroy_parallel, init_parallel

    layout = init_parallel(args.tp, 1)
    arch = arch_from_hf_config(cfg)
    impl = resolve_layer_impl(args.impl)
    switch = {"auto": "auto", "on": True, "off": False}
    options = ModelOptions(layer_impl=impl, recompute=args.recompute, recompute_method=args.recompute_method,
                           recompute_num_layers=args.recompute_num_layers,
                           sequence_parallel=switch[args.sequence_parallel],
                           **{name: switch[args.fusions] for name in FUSIONS})
    model = build_gpt_model(arch, params_dtype=dtype, options=options)
    ddp, opt, sched = wrap_for_training(model, lr=1e-5)
    settings = {"layer_impl": impl, "tp": layout.tp, "recompute": args.recompute,
                "sequence_parallel": model.config.sequence_parallel,
                "fusions": {name: getattr(model.config, name) for name in FUSIONS}}
    if args.recompute == "full":
        settings.update(recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    n_tokens = args.micro_batch * args.seq_len
    mb = MicroBatch(tokens[:, :-1], TokenFields(targets=tokens[:, 1:]), n_tokens)

    def loss_fn(logits, batch):
        return -vocab_parallel_logprobs(logits, batch.fields.targets, vocab_size=arch.vocab_size).sum() / n_tokens, {}

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.packed:
        mb = _packed_row(mb, args.packed, sequence_length_multiple(model.config.sequence_parallel, layout.tp))
    first_loss = []

    def step():
        result = train_step(ddp, opt, sched, [mb], loss_fn)
        if not first_loss:
            first_loss.append(result.loss)

    times = _timed(step, args.steps, args.warmup)
    seq_len = args.seq_len * args.micro_batch // args.packed if args.packed else args.seq_len
    out = {**settings, "packed_sequences": args.packed or None, "first_loss": first_loss[0],
           **_summary(times, n_tokens, flops_per_token(arch, seq_len))}
    del ddp, opt, sched, model
    destroy_parallel()
    return out


def _packed_row(mb, count: int, total_multiple: int = 1):
    """The padded micro-batch's tokens and targets as one packed THD row of ``count`` equal sequences
    (every target a loss token), padded to a multiple of ``total_multiple``."""
    from scope_megatron.packing import pack_sequences

    flat = {"tokens": mb.tokens.reshape(-1), "targets": mb.fields.targets.reshape(-1),
            "response_mask": torch.ones(mb.tokens.numel(), dtype=torch.bool)}
    total = flat["tokens"].numel()
    if count < 1 or total % count:
        raise SystemExit(f"--packed {count}: {total} tokens do not split into {count} equal sequences")
    length = total // count
    return pack_sequences([{k: v[i * length:(i + 1) * length] for k, v in flat.items()} for i in range(count)],
                          total_multiple=total_multiple)


def bench_hf(cfg: dict, args, dtype: torch.dtype) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from scope_megatron.model.arch import arch_from_hf_config

    arch = arch_from_hf_config(cfg)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "torch_dtype"})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    if args.recompute != "none":  # HF has one kind: whole-layer checkpointing
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = _timed(step, args.steps, args.warmup)
    return {"attn_implementation": "sdpa",
            **_summary(times, args.micro_batch * args.seq_len, flops_per_token(arch, args.seq_len))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", help=f"{', '.join(PRESETS)}, tiny, or a config.json path")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--impl", default="auto", choices=["auto", "te", "local", "local_sdpa"])
    parser.add_argument("--recompute", nargs="?", const="full", default="none", choices=["none", "selective", "full"],
                        help="activation recomputation (megatron; HF: whole-layer checkpointing unless none); "
                             "bare --recompute = full")
    parser.add_argument("--recompute-method", default="uniform", choices=["uniform", "block"])
    parser.add_argument("--recompute-num-layers", type=int, default=1)
    parser.add_argument("--fusions", default="auto", choices=["auto", "on", "off"],
                        help="the four megatron fusions together (auto: where the kernels exist)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (run under torchrun with tp processes)")
    parser.add_argument("--sequence-parallel", default="off", choices=["auto", "on", "off"])
    parser.add_argument("--packed", type=int, default=0,
                        help="megatron: feed the micro-batch as one packed THD row of this many sequences")
    parser.add_argument("--frameworks", default="megatron,hf")
    args = parser.parse_args()

    from scope_megatron.logs import setup_logging

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    setup_logging()
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32"))
    cfg = hf_config_dict(args.model)
    result = {"bench": "train_step", "model": args.model, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
              "dtype": str(dtype).removeprefix("torch."), "recompute": args.recompute,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for fw in args.frameworks.split(","):
        if fw == "hf" and distributed:
            result[fw] = {"skipped": "single-process only (run without torchrun)"}
            continue
        try:
            result[fw] = bench_megatron(cfg, args, dtype) if fw == "megatron" else bench_hf(cfg, args, dtype)
        except torch.OutOfMemoryError as err:
            result[fw] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone after bench_megatron
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
