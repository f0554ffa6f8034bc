# Helpers sourced by launch/train.sh and launch/train_multinode.sh (not run on its own).
# Expects PYTHON to be set.

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# normalize_gpu_list NAME "0, 2,3" -> "0,2,3" (dies naming NAME on anything but ids)
normalize_gpu_list() {
  local name=$1 list=${2// /} id ids out=()
  IFS=, read -r -a ids <<<"$list"
  for id in "${ids[@]}"; do
    [[ -z "$id" ]] && continue
    [[ "$id" =~ ^[0-9]+$ ]] || die "$name=$2 is not a comma-separated list of GPU ids"
    out+=("$id")
  done
  (IFS=,; echo "${out[*]}")
}

# gpu_list_intersection "0,1,2" "1,2,5" -> "1,2"
gpu_list_intersection() {
  local a b as bs out=()
  IFS=, read -r -a as <<<"$1"
  IFS=, read -r -a bs <<<"$2"
  for a in "${as[@]}"; do for b in "${bs[@]}"; do [[ "$a" == "$b" ]] && out+=("$a"); done; done
  (IFS=,; echo "${out[*]}")
}

# gpu_list_difference "0,1,2,3" "0,1" -> "2,3"
gpu_list_difference() {
  local a b as bs keep out=()
  IFS=, read -r -a as <<<"$1"
  IFS=, read -r -a bs <<<"$2"
  for a in "${as[@]}"; do
    keep=1
    for b in "${bs[@]}"; do [[ "$a" == "$b" ]] && keep=0; done
    (( keep )) && out+=("$a")
  done
  (IFS=,; echo "${out[*]}")
}

# torchrun SIGKILLs the ranks 30 s after a SIGTERM unless told otherwise (torch
# distributed/launcher/api.py:148-152, elastic/agent/server/local_elastic_agent.py:219); a rank needs
# longer to reach a step boundary and checkpoint. Older torchruns have no --shutdown-timeout: read
# torch's run.py (without importing torch) to know.
shutdown_timeout_args() {
  local timeout=${SHUTDOWN_TIMEOUT:-900}
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "SHUTDOWN_TIMEOUT=$timeout is not a number of seconds"
  if "$PYTHON" - <<'PY'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("torch")
run = pathlib.Path(spec.origin).parent / "distributed" / "run.py" if spec and spec.origin else None
sys.exit(0 if run and run.is_file() and "--shutdown-timeout" in run.read_text() else 1)
PY
  then
    echo "--shutdown-timeout=$timeout"
  else
    echo "$(basename "$0"): warning: this torchrun has no --shutdown-timeout: it kills the ranks 30 s after a" \
      "SIGTERM, which may be too short to checkpoint" >&2
  fi
}

# exec the command, or with DRY_RUN=1 print it (with CUDA_VISIBLE_DEVICES when set) and exit 0
run_or_print() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]] && printf 'CUDA_VISIBLE_DEVICES=%s ' "$CUDA_VISIBLE_DEVICES"
    printf '%q ' "$@"
    echo
    exit 0
  fi
  exec "$@"
}
