#!/usr/bin/env bash
# Train on several nodes: run this on every node with the same MASTER_ADDR / MASTER_PORT.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 \
#     launch/train_multinode.sh CONFIG.yaml rollout.student_urls=[...] teacher.urls=[...] sync.master_address=node0
#
# Global rank 0 (on NODE_RANK 0) is the controller: it talks to the SGLang servers, so they must
# reach it at sync.master_address for the NCCL weight broadcast. Uses torchrun's c10d rendezvous.
set -euo pipefail
CONFIG=${1:?usage: launch/train_multinode.sh CONFIG.yaml [key=value ...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-8}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${RDZV_ID:-scope}" \
  -m scope_megatron.train --config "$CONFIG" "$@"
