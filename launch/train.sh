#!/usr/bin/env bash
# Train on one node:  launch/train.sh CONFIG.yaml [section.field=value ...]
#
# With SERVERS_ENV=runs/servers/servers.env (written by launch/sglang_servers.sh) the student and
# teacher URLs are added as overrides; otherwise the config's URLs are used (none: embedded engines).
# Servers started with COLOCATE=1 (PLACEMENT=colocated in servers.env) share the student's GPUs
# with the trainer: it trains on exactly those GPUs (COLOCATED_GPUS) with placement=colocated.
#
# GPUs: the trainer takes TRAIN_GPUS (comma-separated ids), or else every GPU `nvidia-smi -L` lists
# except the servers' (SERVER_GPUS from SERVERS_ENV when the servers run on this machine, or set
# SERVER_GPUS yourself); CUDA_VISIBLE_DEVICES is set to them and NPROC (one rank per GPU) defaults
# to their number. TRAIN_GPUS that overlap the servers' GPUs are refused. Without GPUs NPROC
# defaults to 1.
#
# Other environment: PYTHON [python]; SHUTDOWN_TIMEOUT [900]: seconds torchrun gives the ranks to
# checkpoint and exit after a SIGTERM before it kills them (torch's default is 30; needs a torchrun
# with --shutdown-timeout); DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
CONFIG=${1:?usage: launch/train.sh CONFIG.yaml [key=value ...]}
shift
PYTHON=${PYTHON:-python}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/torchrun_common.sh
source "$here/torchrun_common.sh"

EXTRA=()
if [[ -n "${SERVERS_ENV:-}" ]]; then
  [[ -f "$SERVERS_ENV" ]] || die "SERVERS_ENV=$SERVERS_ENV does not exist (are the servers up?)"
  SERVER_GPUS_BEFORE=${SERVER_GPUS:-}
  # shellcheck disable=SC1090
  source "$SERVERS_ENV"
  EXTRA+=("rollout.student_urls=${STUDENT_URLS}" "rollout.student_router_url=${STUDENT_ROUTER}"
          "teacher.urls=${TEACHER_URLS}" "teacher.router_url=${TEACHER_ROUTER}")
  # servers on another machine leave this one's GPUs to the trainer
  if [[ -n "${SERVER_HOSTNAME:-}" && "$SERVER_HOSTNAME" != "$(hostname)" ]]; then
    [[ "${PLACEMENT:-separate}" != colocated ]] || die "the colocated student server runs on $SERVER_HOSTNAME," \
      "so the trainer must too: run launch/train.sh there"
    SERVER_GPUS=$SERVER_GPUS_BEFORE
  fi
  if [[ "${PLACEMENT:-separate}" == colocated ]]; then
    EXTRA+=("placement=colocated")
    colocated=$(normalize_gpu_list COLOCATED_GPUS "${COLOCATED_GPUS:-}")
    if [[ -n "${TRAIN_GPUS:-}" ]]; then
      [[ "$(normalize_gpu_list TRAIN_GPUS "$TRAIN_GPUS")" == "$colocated" ]] || die "TRAIN_GPUS=$TRAIN_GPUS:" \
        "the colocated student server runs on GPUs $colocated, and the trainer must train on exactly those"
    fi
    # without GPUs (embedded engines on CPU) the launcher's GPU ids select nothing
    if command -v nvidia-smi >/dev/null 2>&1; then TRAIN_GPUS=$colocated; fi
  fi
fi
SERVER_GPUS=${SERVER_GPUS:-}

if [[ -n "${TRAIN_GPUS:-}" ]]; then
  gpus=$(normalize_gpu_list TRAIN_GPUS "$TRAIN_GPUS")
  overlap=$(gpu_list_intersection "$gpus" "$SERVER_GPUS")
  [[ -z "$overlap" ]] || die "TRAIN_GPUS=$TRAIN_GPUS overlaps the servers' GPUs SERVER_GPUS=$SERVER_GPUS (GPU $overlap);" \
    "give the trainer other GPUs"
elif command -v nvidia-smi >/dev/null 2>&1; then
  all=$(nvidia-smi -L | grep -c '^GPU ' || true)
  all_ids=$(seq -s, 0 $((all - 1)))
  [[ $all -gt 0 ]] || die "nvidia-smi -L lists no GPU"
  gpus=$(gpu_list_difference "$all_ids" "$SERVER_GPUS")
  [[ -n "$gpus" ]] || die "all $all GPUs of this machine are the servers' (SERVER_GPUS=$SERVER_GPUS); none left to train on"
else
  gpus=""
fi

[[ -z "${NPROC:-}" || "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC is not a positive number of ranks"
if [[ -n "$gpus" ]]; then
  count=$(awk -F, '{print NF}' <<<"$gpus")
  NPROC=${NPROC:-$count}
  (( NPROC <= count )) || die "NPROC=$NPROC ranks but only $count GPUs for the trainer ($gpus)"
  gpus=$(cut -d, -f1-"$NPROC" <<<"$gpus")
  export CUDA_VISIBLE_DEVICES=$gpus
  echo "train.sh: training on GPUs $gpus (NPROC=$NPROC)${SERVER_GPUS:+; the servers use $SERVER_GPUS}" >&2
else
  NPROC=${NPROC:-1}
fi

export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONUNBUFFERED=1
shutdown=$(shutdown_timeout_args)
# shellcheck disable=SC2086  # $shutdown: no flag or one word
CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" $shutdown
     -m scope_megatron.train --config "$CONFIG" "${EXTRA[@]}" "$@")
run_or_print "${CMD[@]}"
