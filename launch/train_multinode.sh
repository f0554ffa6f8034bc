#!/usr/bin/env bash
# Train on several nodes: run this on every node with the same NNODES / MASTER_ADDR / MASTER_PORT
# and each node's own NODE_RANK (0 .. NNODES-1):
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 \
#     launch/train_multinode.sh CONFIG.yaml rollout.student_urls=[...] teacher.urls=[...]
#
# Global rank 0 (the controller: it talks to the SGLang servers and hosts the weight broadcast) is
# on NODE_RANK 0, which must be MASTER_ADDR: torchrun's static rendezvous places node ranks as
# given. (Its c10d rendezvous would ignore --node-rank and order the nodes by hostname,
# torch/distributed/run.py:969-974, so rank 0 could land on another node.) The servers must reach
# rank 0 at sync.master_address.
#
# Other environment: NPROC [8] ranks per node; PYTHON [python]; SHUTDOWN_TIMEOUT [900] seconds
# torchrun gives the ranks to checkpoint and exit after a SIGTERM (see launch/train.sh);
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
CONFIG=${1:?usage: launch/train_multinode.sh CONFIG.yaml [key=value ...]}
shift
PYTHON=${PYTHON:-python}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/torchrun_common.sh
source "$here/torchrun_common.sh"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-8}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES is not a positive number"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1))"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC is not a positive number of ranks"
shutdown=$(shutdown_timeout_args)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONUNBUFFERED=1
# shellcheck disable=SC2086  # $shutdown: no flag or one word
CMD=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc_per_node="$NPROC"
     --rdzv-backend=static --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" $shutdown
     -m scope_megatron.train --config "$CONFIG" "$@")
run_or_print "${CMD[@]}"
