#!/usr/bin/env bash
# Start the student and teacher SGLang servers (scope_megatron.rollout.launcher) and keep them up.
#
#   STUDENT=/models/DeepSeek-R1-Distill-Qwen-1.5B TEACHER=/models/Skywork-OR1-7B \
#   STUDENT_GPUS=0,1 TEACHER_GPUS=2,3 launch/sglang_servers.sh runs/servers
#
# One student replica per GPU in STUDENT_GPUS (TP 1) and teacher replicas of TEACHER_TP GPUs;
# several replicas get an sglang_router in front. Logs: OUT_DIR/logs/. Once every server is
# healthy, the URLs are printed and written to OUT_DIR/servers.env (STUDENT_URLS, STUDENT_ROUTER,
# TEACHER_URLS, TEACHER_ROUTER as the trainer's overrides expect them, plus SERVER_GPUS and
# SERVER_HOSTNAME: launch/train.sh reads that file when SERVERS_ENV is set and trains on the
# other GPUs of this machine). servers.env exists only while the servers are up.
# Ctrl-C / SIGTERM stops every server (also while they are still starting).
#
# Environment (defaults in brackets):
#   STUDENT_GPUS [0], TEACHER_GPUS [1], TEACHER_TP [1]   GPU ids of this machine
#   HOST [127.0.0.1]   address the servers bind and the URLs name (a node name for other machines)
#   STUDENT_PORT [30000], TEACHER_PORT [30100]   first port of each role (one per replica)
#   ENGINE [sglang]    or "embedded": scope-megatron's transformers engine (same HTTP protocol)
#   SEEDED [1]         students run with --enable-deterministic-inference, which SGLang (and the
#                      embedded engine) need to honour rollout.seeded's sampling seeds (costs
#                      throughput); 0 for rollout.seeded=false.
#   ROUTER_HEALTH_TIMEOUT_S [30], ROUTER_HEALTH_FAILURES [30]   the student router's health
#                      checks: SGLang's /health blocks while a weight update pauses the server,
#                      so the router must tolerate failed probes (every 60 s) for longer than one
#   EXTRA_STUDENT_ARGS, EXTRA_TEACHER_ARGS [none]   more server flags (SGLang's prefix cache is on
#                      by default; --disable-radix-cache turns it off)
#   COLOCATE [0]       1: the student shares the trainer's GPUs (placement: colocated): ONE student
#                      server over all of STUDENT_GPUS (--tp-size = their number) with
#                      --enable-memory-saver, and servers.env says PLACEMENT=colocated so that
#                      launch/train.sh trains on exactly those GPUs. Run train.sh on this machine.
#   STUDENT_MEM_FRACTION [0.5]   with COLOCATE=1 and SGLang: --mem-fraction-static of the student
#                      (weights + KV cache while it generates; the trainer's parameters stay on
#                      the GPUs meanwhile, so leave them room)
#   ROLES [student,teacher]   the servers to start: both, or only "student" / only "teacher"
#                      (servers.env then lists that role's URLs only; launch/slurm/scope.sbatch
#                      with COLOCATE=1 starts the teacher on its server node and one colocated
#                      student on each training node)
#   PYTHON [python]
set -euo pipefail
OUT_DIR=${1:-runs/servers}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# the variables above are read (and checked, defaults applied) by scope_megatron/rollout/launcher.py
exec "${PYTHON:-python}" -m scope_megatron.rollout.launcher "$OUT_DIR"
