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

# GPUs on this node, never failing: the training Python's torch first (it is what trains, and it
# honours CUDA_VISIBLE_DEVICES), else nvidia-smi (needs no Python; counts every GPU of the node),
# else 1 process (CPU). The system python3 may have no torch at all.
gpu_count() {
  local n=""
  if n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) \
      && [[ "$n" =~ ^[0-9]+$ ]]; then
    :
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if [[ "$n" =~ ^[0-9]+$ ]] && ((10#$n > 0)); then echo "$n"; else echo 1; fi
}

NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ${MAX_RESTARTS:+--max-restarts "$MAX_RESTARTS"} \
  launchers/train.py "$@"
