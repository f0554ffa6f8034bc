#!/usr/bin/env bash
# Start the student and teacher SGLang servers (scope_megatron.rollout.launcher) and keep them up.
#
#   STUDENT=/models/DeepSeek-R1-Distill-Qwen-1.5B TEACHER=/models/Skywork-OR1-7B \
#   STUDENT_GPUS=0,1 TEACHER_GPUS=2,3 launch/sglang_servers.sh runs/servers
#
# One student replica per GPU in STUDENT_GPUS (TP 1) and teacher replicas of TEACHER_TP GPUs;
# several replicas get an sglang_router in front. Logs: OUT_DIR/logs/. The URLs are printed and
# written to OUT_DIR/servers.env (STUDENT_URLS, STUDENT_ROUTER, TEACHER_URLS, TEACHER_ROUTER) as
# the trainer's overrides expect them; launch/train.sh reads that file when SERVERS_ENV is set.
# Ctrl-C / SIGTERM stops every server. ENGINE=embedded serves with the CPU/GPU transformers engine.
set -euo pipefail
OUT_DIR=${1:-runs/servers}
: "${STUDENT:?set STUDENT to the student HF directory}"
: "${TEACHER:?set TEACHER to the teacher HF directory}"
export STUDENT TEACHER OUT_DIR
export STUDENT_GPUS=${STUDENT_GPUS:-0} TEACHER_GPUS=${TEACHER_GPUS:-1} TEACHER_TP=${TEACHER_TP:-1}
export HOST=${HOST:-127.0.0.1} STUDENT_PORT=${STUDENT_PORT:-30000} TEACHER_PORT=${TEACHER_PORT:-30100}
export ENGINE=${ENGINE:-sglang} EXTRA_STUDENT_ARGS=${EXTRA_STUDENT_ARGS:-} EXTRA_TEACHER_ARGS=${EXTRA_TEACHER_ARGS:-"--enable-prefix-caching"}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
PYTHON=${PYTHON:-python}
exec "$PYTHON" - <<'PY'
import os, shlex, signal, threading
from pathlib import Path
from scope_megatron.logs import setup_logging
from scope_megatron.rollout.launcher import RolloutServers, ServerGroupSpec

setup_logging()
env = os.environ
gpus = lambda s: [int(x) for x in s.split(",") if x.strip()]
student_gpus, teacher_gpus, teacher_tp = gpus(env["STUDENT_GPUS"]), gpus(env["TEACHER_GPUS"]), int(env["TEACHER_TP"])
engine = env["ENGINE"]
teacher_args = shlex.split(env["EXTRA_TEACHER_ARGS"]) if engine == "sglang" else []
groups = [
    ServerGroupSpec(role="student", model_path=env["STUDENT"], num_replicas=len(student_gpus), tp_size=1,
                    gpu_ids=student_gpus, base_port=int(env["STUDENT_PORT"]), engine=engine,
                    extra_args=shlex.split(env["EXTRA_STUDENT_ARGS"])),
    ServerGroupSpec(role="teacher", model_path=env["TEACHER"], num_replicas=len(teacher_gpus) // teacher_tp,
                    tp_size=teacher_tp, gpu_ids=teacher_gpus, base_port=int(env["TEACHER_PORT"]), engine=engine,
                    extra_args=teacher_args),
]
out = Path(env["OUT_DIR"]); out.mkdir(parents=True, exist_ok=True)
stop = threading.Event()
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
with RolloutServers(run_dir=out, groups=groups, host=env["HOST"]) as servers:
    ep = servers.start()
    lines = [f"STUDENT_URLS=[{','.join(ep['student'].worker_urls)}]", f"STUDENT_ROUTER={ep['student'].url}",
             f"TEACHER_URLS=[{','.join(ep['teacher'].worker_urls)}]", f"TEACHER_ROUTER={ep['teacher'].url}"]
    (out / "servers.env").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    stop.wait()
PY
