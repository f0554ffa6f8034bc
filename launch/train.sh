#!/usr/bin/env bash
# Train on one node:  launch/train.sh CONFIG.yaml [section.field=value ...]
#
# NPROC (default: number of GPUs, or 1 without GPUs) ranks under torchrun. With
# SERVERS_ENV=runs/servers/servers.env (written by launch/sglang_servers.sh) the student and
# teacher URLs are added as overrides; otherwise the config's URLs are used (none: embedded engines).
set -euo pipefail
CONFIG=${1:?usage: launch/train.sh CONFIG.yaml [key=value ...]}
shift
if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NPROC=$(nvidia-smi -L | wc -l); else NPROC=1; fi
fi
EXTRA=()
if [[ -n "${SERVERS_ENV:-}" ]]; then
  # shellcheck disable=SC1090
  source "$SERVERS_ENV"
  EXTRA+=("rollout.student_urls=${STUDENT_URLS}" "rollout.student_router_url=${STUDENT_ROUTER}"
          "teacher.urls=${TEACHER_URLS}" "teacher.router_url=${TEACHER_ROUTER}")
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m scope_megatron.train --config "$CONFIG" "${EXTRA[@]}" "$@"
