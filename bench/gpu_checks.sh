#!/usr/bin/env bash
# The GPU checks for a lent single-GPU session (H100/H200), about 5 minutes; one JSON line per check
# ({"check": ..., "ok": ..., figures}), see bench/gpu_checks.py for what each covers and its tolerance:
#   env (versions, device check, megatron's HAVE_TE), parity_bf16 / parity_fp32 (HF vs megatron,
#   layer_impl auto), scope_train (2 SCOPE steps, embedded engines on the training GPU, disk sync),
#   resume (1 more step from the latest checkpoint), recompute (model.recompute=full), loss_compile
#   (torch.compile'd log-prob kernels vs eager, bench/loss.py timing), knobs (bench/train_step.py with
#   and without each model knob: fusions, recompute selective / full, packed rows, TP2 + sequence
#   parallelism when 2 GPUs are visible; tokens/s, peak memory, same first loss); then the GPU-marked tests.
# BENCH=1 adds the throughput benchmarks (bench/train_step.py for Qwen3-0.6B / 4B shapes, bench/loss.py
# at 4096 / 16384 tokens, bench/packing.py), several more minutes.
# The device machine has torch and transformers but no megatron-core: carry its wheel in .whl/
#   (here: echo /.whl/ >> .git/info/exclude; pip download --no-deps --python-version 3.12 \
#    --only-binary=:all: --platform manylinux2014_x86_64 -d .whl megatron-core==0.19.2)
# Output: the JSON lines on stdout and in ${OUT:-/tmp/gpu_checks}/checks.jsonl, logs next to them.
# SMALL=1 shrinks every size for a CPU dry run (a few minutes on 2 cores).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"; export OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PY=${PY:-python3}
export OMP_WAIT_POLICY=PASSIVE PYTHONWARNINGS=ignore

$PY bench/gpu_checks.py --out "$OUT" $([ "${SMALL:-0}" = 1 ] && echo --small) 2>"$OUT/gpu_checks.log" | tee "$OUT/checks.jsonl"
status=${PIPESTATUS[0]}
$PY -m pytest -q -m gpu tests/test_cpu_shims.py -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/pytest_gpu.txt"

if [ "${BENCH:-0}" = 1 ]; then
  if [ "${SMALL:-0}" = 1 ]; then SEQ=128; MODELS="tiny"; LOSS_ARGS="--tokens 256 --vocab 4096"
    PACK_ARGS="--sequences 16 --scale 64"
  else SEQ=4096; MODELS="qwen3-0.6b qwen3-4b"; LOSS_ARGS="--tokens 4096 16384"
    PACK_ARGS="--scale 1 --model qwen3-0.6b --dtype bfloat16 --sequences 32 --micro-batch-size 2 --max-tokens 16384"; fi
  for m in $MODELS; do
    extra=""; [ "$m" = qwen3-4b ] && extra="--recompute full"  # 4B: 18 bytes/param of Adam state + activations
    $PY bench/train_step.py --model $m --seq-len $SEQ $extra 2>>"$OUT/bench.log" | tee -a "$OUT/train_step.jsonl"
  done
  $PY bench/loss.py $LOSS_ARGS 2>>"$OUT/bench.log" | tee -a "$OUT/loss.jsonl"
  timeout 240 $PY bench/packing.py $PACK_ARGS 2>>"$OUT/bench.log" | tee -a "$OUT/packing.jsonl"
fi
exit $status
