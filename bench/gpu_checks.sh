#!/usr/bin/env bash
# All GPU checks of the foundation in one run of a few minutes, for a lent H100/H200 session:
#   1. Megatron-vs-HF parity in bf16 with the local + SDPA layer spec (Qwen3-0.6B shape, random weights)
#   2. bench/train_step.py, Megatron vs HF, for Qwen3-0.6B and Qwen3-4B shapes at 4096 tokens
#   3. bench/loss.py at 4096 and 16384 tokens (issue 3's targets)
#   4. the GPU-marked tests (CPU shims never active on a GPU)
#   5. bench/packing.py: packed (THD, token budget) vs padded micro-batches, Qwen3-0.6B shape, bf16, full lengths
# The device machine has torch and transformers but no megatron-core: carry its wheel in .whl/
#   (here: echo /.whl/ >> .git/info/exclude; pip download --no-deps --python-version 3.12 \
#    --only-binary=:all: --platform manylinux2014_x86_64 -d .whl megatron-core==0.19.2)
# Output: JSON lines and logs under ${OUT:-/tmp/gpu_checks}. SMALL=1 shrinks every size (CPU dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=${PY:-python3}
export OMP_WAIT_POLICY=PASSIVE PYTHONWARNINGS=ignore
if [ "${SMALL:-0}" = 1 ]; then SEQ=128; MODELS="tiny"; SHAPE='{}'; else SEQ=4096; MODELS="qwen3-0.6b qwen3-4b"
  SHAPE='{"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": true, "max_position_embeddings": 40960}'; fi
$PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee "$OUT/env.txt"

echo "== 1. parity (bf16, local+SDPA)"
W=$(mktemp -d)
$PY - "$W" "$SHAPE" <<'PYEOF'
import json, sys, torch
from scope_megatron.tiny_models import save_tiny_hf_model
save_tiny_hf_model(sys.argv[1] + "/hf", "qwen3", dtype="bfloat16", **json.loads(sys.argv[2]))
PYEOF
$PY -m checkpoints_tools.hf_to_megatron --hf "$W/hf" --out "$W/ckpt" 2>"$OUT/convert.log" | tee "$OUT/convert.json"
for dt in bfloat16 float32; do
  $PY -m checkpoints_tools.verify --hf "$W/hf" --ckpt "$W/ckpt" --dtype $dt --impl local_sdpa --tol 1.0 \
    --lengths 128,$SEQ 2>>"$OUT/verify.log" | tee -a "$OUT/parity.jsonl"
done

echo "== 2. bench/train_step.py"
for m in $MODELS; do
  extra=""; [ "$m" = qwen3-4b ] && extra="--recompute"  # 4B: 18 bytes/param of Adam state + activations
  $PY bench/train_step.py --model $m --seq-len $SEQ $extra 2>>"$OUT/bench.log" | tee -a "$OUT/train_step.jsonl"
done

echo "== 3. bench/loss.py (vocab-parallel log-probs + loss + backward vs naive / megatron CE)"
if [ "${SMALL:-0}" = 1 ]; then LOSS_ARGS="--tokens 256 --vocab 4096"; else LOSS_ARGS="--tokens 4096 16384"; fi
$PY bench/loss.py $LOSS_ARGS 2>>"$OUT/bench.log" | tee -a "$OUT/loss.jsonl"

echo "== 4. GPU-marked tests"
$PY -m pytest -q -m gpu tests/test_cpu_shims.py -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/pytest_gpu.txt"

echo "== 5. bench/packing.py (packed vs padded tokens/s, long-tailed lengths mean ~4k, max 16k)"
if [ "${SMALL:-0}" = 1 ]; then PACK_ARGS="--sequences 16 --scale 64"; else
  PACK_ARGS="--scale 1 --model qwen3-0.6b --dtype bfloat16 --sequences 32 --micro-batch-size 2 --max-tokens 16384"; fi
timeout 240 $PY bench/packing.py $PACK_ARGS 2>>"$OUT/bench.log" | tee -a "$OUT/packing.jsonl"
rm -rf "$W"
