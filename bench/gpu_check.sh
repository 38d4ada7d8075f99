#!/usr/bin/env bash
# The GPU check in one command (see bench/gpu_check.py): fused-kernel bit equality, the optimizer
# step against the HBM roofline, and a 1-GPU DPO run (AdamW / OnDARE / OnTIES) with the memory
# planner's prediction; writes docs/gpu_results.md. Run time: each part has a time limit (a: 100,
# b: 150, c: 60 s to prepare + 90 s for each of its 3 optimizer runs; 580 s in all); about 4 to 5 minutes on an H200.
#
#   bash bench/gpu_check.sh [gpu_check.py options]   run it (installs from bench/wheels/ if present)
#   bash bench/gpu_check.sh --download               fill bench/wheels/ (on a machine with network)
#
# The GPU machine needs python3 with torch (CUDA) and triton. What the trainer needs beyond that and
# a machine without network may lack is brought as wheels for CPython 3.12 on x86-64 Linux, made by
# --download: megatron-core and mbridge (not on PyPI images with torch), transformers 4.57 with the
# tokenizers and huggingface-hub it accepts (mbridge 0.15 needs transformers < 5), and pydantic (the
# config's type checks). They are installed with --no-deps into a temporary directory put first on
# PYTHONPATH, so the machine's own packages are left as they are. Transformer Engine and apex are
# used where they import and are not required: without them the trainer builds megatron-core's
# local layers and the benchmark skips their FusedAdam.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
wheels="$here/wheels"
python="${PYTHON:-python3}"

# Pinned as in constraints.txt; tokenizers and huggingface-hub at the newest versions transformers 4.57 accepts.
WHEELS=(
  megatron-core==0.16.1
  mbridge==0.15.1
  transformers==4.57.6
  tokenizers==0.22.2
  huggingface-hub==0.36.2
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
)

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p "$wheels"
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels" "${WHEELS[@]}"
  echo "bench/wheels/:"
  ls -l "$wheels"
  du -sh "$wheels"
  exit 0
fi

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site="$(mktemp -d)/site"
  echo "[gpu_check] installing $(ls "$wheels"/*.whl | wc -l) wheels from bench/wheels/ into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site:$PYTHONPATH"
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron-core's setting for overlapping communication
exec "$python" "$here/gpu_check.py" "$@"
