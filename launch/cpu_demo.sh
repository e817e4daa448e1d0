#!/usr/bin/env bash
# Multi-process training on CPU: `torchrun` starts NPROC (default 2) processes on gloo that train the tiny AoE model
# data-parallel (DDP for the dense weights, the expert gradients all-reduced over the expert-data-parallel group).
# Add `--set parallel.expert_parallel_size=2` to shard the experts over the two processes instead.
# Run `bash launch/setup.sh` once first. Writes under runs/tiny-cpu<NPROC>-<time>/ (OUT_DIR overrides); extra
# arguments go to `aoe-ep train`.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
OUT_DIR=${OUT_DIR:-runs/tiny-cpu${NPROC}-$(date +%Y%m%d-%H%M%S)}
eval "$("${PYTHON:-python3}" -m aoe_ep.cpu_allocator)"  # tcmalloc / jemalloc when installed (aoe_ep/cpu_allocator.py)
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" \
  -m aoe_ep.cli train --config tiny --set train.out_dir="$OUT_DIR" --set train.device=cpu "$@"
