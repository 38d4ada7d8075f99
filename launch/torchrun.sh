#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU (or NPROC processes on CPU, gloo).
#   launch/torchrun.sh configs/llama3_8b_dpo_ondare.yaml [--set key=value ...]
#   NPROC=2 launch/torchrun.sh configs/tiny_cpu_dpo.yaml
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [--set key=value ...]" >&2
  exit 2
fi
CONFIG="$1"; shift
if [[ -z "${NPROC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NPROC=$(nvidia-smi -L | wc -l); else NPROC=1; fi
fi
# Check the config (keys, types, files, parallel sizes for this world size) before starting workers.
python -m onmerge_megatron.training.cli check-config --config "$CONFIG" --world-size "$NPROC" "$@" >/dev/null
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "$NPROC" -m onmerge_megatron.training.cli train --config "$CONFIG" "$@"
