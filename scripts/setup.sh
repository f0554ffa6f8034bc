#!/usr/bin/env bash
# Set up scope-megatron in ./.venv (reused when present): Python 3.12, torch, megatron-core 0.19,
# transformers, and the package itself in editable mode with its test and wandb extras.
# Usage: bash scripts/setup.sh            (idempotent; a second run takes a few seconds)
#        PYTHON=/path/to/python3.12 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

is_py312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_py312 "$c" && { command -v "$c"; return 0; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.12.*/bin/python3.12; do
      [ -x "$c" ] && is_py312 "$c" && { echo "$c"; return 0; }
    done
  fi
  for c in /usr/bin/python3.12 /usr/local/bin/python3.12 "$HOME"/.pyenv/versions/3.12.*/bin/python3.12; do
    [ -x "$c" ] && is_py312 "$c" && { echo "$c"; return 0; }
  done
  return 1
}

if [ -x .venv/bin/python ] && is_py312 .venv/bin/python; then
  echo "setup: reusing .venv ($(.venv/bin/python --version))"
else
  if ! PY=$(find_python); then
    cat >&2 <<'MSG'
setup: error: no Python 3.12 interpreter found (looked at $PYTHON, python3.12 and python3 on PATH,
pyenv's versions, /usr/bin, /usr/local/bin). megatron-core 0.19 needs exactly Python 3.12. Install one:
  pyenv install 3.12          (then re-run; pyenv versions are found without activating them)
  sudo apt-get install python3.12 python3.12-venv     (Debian/Ubuntu with python3.12 packages)
  uv python install 3.12      (then: PYTHON=$(uv python find 3.12) bash scripts/setup.sh)
MSG
    exit 1
  fi
  echo "setup: creating .venv with $PY"
  rm -rf .venv
  "$PY" -m venv .venv
fi

# Install (or refresh) when setup.py changed since the last successful install.
stamp=.venv/.scope-megatron-installed
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing dependencies (first time: downloads torch, ~3 GB; several minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test,wandb]"
  echo "$want" > "$stamp"
else
  echo "setup: dependencies up to date"
fi

# SGLang's own request schema and CLI parser, used by tests to check our client's payloads and
# the server argv we build (not installed).
if ! ls .venv/wheels/sglang-0.5.23-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d .venv/wheels "sglang==0.5.23" \
    || echo "setup: warning: could not download the sglang 0.5.23 wheel; its schema and parser tests will be skipped" >&2
fi
# sglang-router's CLI parser, used by a test to check the router argv we build (not installed).
if ! ls .venv/wheels/sglang_router-0.3.2-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: -d .venv/wheels "sglang-router==0.3.2" \
    || echo "setup: warning: could not download the sglang-router 0.3.2 wheel; its parser test will be skipped" >&2
fi
echo "setup: done ($(.venv/bin/python -W ignore -c 'import torch, megatron.core as m; print(f"torch {torch.__version__}, megatron-core {m.__version__}")'))"
