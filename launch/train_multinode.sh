#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR (a host all nodes reach: the rendezvous endpoint),
# NNODES and RDZV_ID. Every argument goes to `aoe-ep train`:
#   MASTER_ADDR=node0 NNODES=4 bash launch/train_multinode.sh --config paper/aoe_4b --resume auto
# The rendezvous is torchrun's c10d (RDZV_BACKEND=c10d, the default): the agent on MASTER_ADDR hosts it, the others
# join, and when a worker dies every agent stops its workers and starts them again, up to MAX_RESTARTS times
# (default 0); a restarted run resumes from the newest complete checkpoint of train.out_dir by itself. Node ranks
# come from the rendezvous; RDZV_BACKEND=static instead needs each node's NODE_RANK (under SLURM: SLURM_NODEID).
# Global ranks are node-major, so the expert-parallel groups (EP consecutive ranks) stay inside a node when EP
# divides the processes per node (NPROC, default: the node's GPUs, or 1).
# train.out_dir must lie on a filesystem every node sees: each rank writes its own checkpoint shards there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (e.g. the first node)}"
: "${NNODES:?set NNODES to the number of nodes}"
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
# A fresh store for the workers in every rendezvous round: the one torchrun shares across rounds by default keeps
# the dead workers' addresses, which restarted workers then read, and their process groups fail to connect.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
case "$RDZV_BACKEND" in
  c10d) NODE_ARGS=() ;;
  static) NODE_ARGS=(--node-rank "${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK (0 .. NNODES-1) on each node}}") ;;
  *) echo "train_multinode.sh: error: RDZV_BACKEND must be c10d or static, got '$RDZV_BACKEND'" >&2; exit 2 ;;
esac
eval "$("$PY" -m aoe_ep.cpu_allocator)"  # tcmalloc / jemalloc when installed (aoe_ep/cpu_allocator.py)
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" ${NODE_ARGS[@]+"${NODE_ARGS[@]}"} --nproc-per-node "$NPROC" \
  --rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-aoe-ep}" --max-restarts "${MAX_RESTARTS:-0}" -m aoe_ep.cli train "$@"
