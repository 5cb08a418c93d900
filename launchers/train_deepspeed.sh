#!/usr/bin/env bash
# DeepSpeed launcher. With a hostfile (one line per node: "node1 slots=8") it starts every node
# over ssh; without one it runs on this machine.
#
#   HOSTFILE=launchers/hostfile launchers/train_deepspeed.sh --config launchers/configs/mistral7b_qlora_stage1.yaml
#   NUM_GPUS=2 launchers/train_deepspeed.sh --config launchers/configs/tiny_cpu.yaml   # CPU ranks
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH"

args=()
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
else
  args+=(--num_gpus "${NUM_GPUS:-1}")
fi
exec deepspeed "${args[@]}" --master_port "${MASTER_PORT:-29500}" launchers/train.py "$@"
