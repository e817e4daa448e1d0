#!/usr/bin/env bash
# Several nodes: run this on every node with the same MASTER_ADDR (a host all nodes reach: the rendezvous endpoint),
# NNODES and RDZV_ID, and each node's own NODE_RANK (0 .. NNODES-1). Every argument goes to `aoe-ep train`:
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=0 bash launch/train_multinode.sh --config paper/aoe_4b --resume auto
# Under SLURM, NODE_RANK defaults to SLURM_NODEID (see launch/slurm.sbatch). Global ranks are node-major, so the
# expert-parallel groups (EP consecutive ranks) stay inside a node when EP divides the GPUs per node.
# train.out_dir must lie on a filesystem every node sees: each rank writes its own checkpoint shards there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (e.g. the first node)}"
: "${NNODES:?set NNODES to the number of nodes}"
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK (0 .. NNODES-1) on each node}}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)")}
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --rdzv-backend "${RDZV_BACKEND:-static}" --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-aoe-ep}" -m aoe_ep.cli train "$@"
