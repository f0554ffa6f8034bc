"""Weight sync on CPU, in memory (``update_weights_from_tensor``: shared-memory handles, the
colocated layout) against over a gloo group (``update_weights_from_distributed``: the separate
layout's transport) and through files (``update_weights_from_disk``), into one embedded engine.

For each model size an HF model is written (qwen3 family, float32), an embedded engine process
serves it (with the memory saver, as a colocated engine runs), and :class:`WeightTransfer` pushes
the same named tensors with each transport ``--repeats`` times (after one warm-up push each,
which for ``distributed`` also forms the group). Reported per transport: bytes, buckets, the
median wall seconds of an update (``seconds_total``: pause, transfer, resume and the version
check) and its transfer part, and the in-memory / gloo ratio, all from one run. Prints one JSON
object. The defaults: ``tiny`` (the tests' model, 0.11M parameters) and ``100m`` (hidden 768, 14
layers, 88M parameters, 0.35 GB in float32).

    python bench/sync_transport.py
    python bench/sync_transport.py --sizes tiny --repeats 5 --bucket-mb 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"tiny": {}, "100m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 14,
                              "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64}}


def measure(size: str, root: Path, repeats: int, bucket_mb: int) -> dict:
    """One model size: every transport's bytes and median seconds into one embedded engine."""
    from safetensors.torch import load_file

    from scope_megatron.examples.tiny_models import save_tiny_hf_model
    from scope_megatron.parallel import free_port
    from scope_megatron.rollout.embedded_server import start_embedded_server_process
    from scope_megatron.rollout.weight_transfer import WeightTransfer

    model_dir = save_tiny_hf_model(root / size, "qwen3", seed=0, **SIZES[size])
    named = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        named.update(load_file(str(f)))
    parameters = sum(t.numel() for t in named.values())
    handle = start_embedded_server_process(model_dir, free_port(), extra_args=["--enable-memory-saver"],
                                           log_path=root / f"{size}-engine.log", ready_timeout=300)
    out = {"parameters": parameters, "bytes": sum(t.numel() * t.element_size() for t in named.values())}
    try:
        for transport in ("tensor", "distributed", "disk"):
            kwargs = {"disk_dir": root / f"{size}-disk"} if transport == "disk" else {}
            with WeightTransfer([handle.url], transport=transport, bucket_bytes=bucket_mb << 20, backend="gloo",
                                **kwargs) as transfer:
                stats = [transfer.update(named.items(), weight_version=f"{transport}-{i}") for i in range(repeats + 1)]
            timed = stats[1:]  # the first push also connects (the gloo group) and warms the engine
            out[transport] = {"num_bytes": timed[0].num_bytes, "num_buckets": timed[0].num_buckets,
                              "seconds_total_median": statistics.median(s.seconds_total for s in timed),
                              "seconds_transfer_median": statistics.median(s.seconds_transfer for s in timed),
                              "seconds_total_all": [round(s.seconds_total, 4) for s in timed]}
    finally:
        handle.stop()
    out["ratio_tensor_over_distributed"] = (out["tensor"]["seconds_total_median"]
                                            / max(out["distributed"]["seconds_total_median"], 1e-9))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sync_transport_") as tmp:
        results = {size: measure(size, Path(tmp), args.repeats, args.bucket_mb) for size in args.sizes}
    print(json.dumps({"bench": "sync_transport", "device": "cpu", "bucket_mb": args.bucket_mb,
                      "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
