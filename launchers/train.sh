#!/usr/bin/env bash
# torchrun launcher, one node or many.
#
# One node, 8 GPUs:
#   launchers/train.sh --config launchers/configs/mistral7b_qlora_stage1.yaml
# Two nodes (run on each node, NODE_RANK 0 and 1, MASTER_ADDR = node 0's address):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launchers/train.sh --config ...
# CPU (tests): NPROC_PER_NODE=2 launchers/train.sh --config launchers/configs/tiny_cpu.yaml
set -euo pipefail
cd "$(dirname "$0")/.."

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-.venv/bin/python}

# GPUs on this node (launchers/_gpus.sh): never the system python3, which may lack torch.
# shellcheck source=launchers/_gpus.sh
source launchers/_gpus.sh
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count "$PYTHON")}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ${MAX_RESTARTS:+--max-restarts "$MAX_RESTARTS"} \
  launchers/train.py "$@"
