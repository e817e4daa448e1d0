#!/usr/bin/env bash
# One node: torchrun starts one process per GPU (NPROC overrides; 1 on a machine without GPUs). Every argument goes
# to `aoe-ep train`, e.g.
#   bash launch/train.sh --config paper/aoe_732m
#   bash launch/train.sh --config paper/table2/05_aoe_dlow64 --set parallel.expert_parallel_size=8 --resume auto
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")}
eval "$("$PY" -m aoe_ep.cpu_allocator)"  # tcmalloc / jemalloc when installed (aoe_ep/cpu_allocator.py)
exec "$PY" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" -m aoe_ep.cli train "$@"
