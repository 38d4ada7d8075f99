#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU (or NPROC processes on CPU, gloo).
#   launch/torchrun.sh configs/llama3_8b_dpo_ondare.yaml [--set key=value ...]
#   NPROC=2 launch/torchrun.sh configs/tiny_cpu_dpo.yaml
# Python: `python` on PATH if it has torch and this package (an active environment), else the
# project's .venv (made by `make demo` / `make test`).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [--set key=value ...]" >&2
  exit 2
fi
CONFIG="$1"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
has_project() { [[ -n "$1" ]] && "$1" -c "import torch, onmerge_megatron" 2>/dev/null; }
PYTHON="$(command -v python || command -v python3 || true)"
if ! has_project "$PYTHON"; then
  PYTHON="$ROOT/.venv/bin/python"
  if ! has_project "$PYTHON"; then
    echo "error: no Python with torch and onmerge_megatron: neither \`python\` on PATH nor $ROOT/.venv." \
         "Run \`make test\` or \`make demo\` once (they create .venv and install the project there)," \
         "or activate the environment that has them." >&2
    exit 2
  fi
fi
if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NPROC=$(nvidia-smi -L | wc -l); else NPROC=1; fi
fi
# Check the config (keys, types, files, parallel sizes for this world size) before starting workers.
"$PYTHON" -m onmerge_megatron.training.cli check-config --config "$CONFIG" --world-size "$NPROC" "$@" >/dev/null
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# `python -m torch.distributed.run` is torchrun, run by this Python.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m onmerge_megatron.training.cli train --config "$CONFIG" "$@"
