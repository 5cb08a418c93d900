# shellcheck shell=bash
# Sourced by the launchers: how many GPUs this node offers, never failing under `set -euo pipefail`.
#
# The training Python's torch first (it is what trains, and it honours CUDA_VISIBLE_DEVICES), else
# nvidia-smi (needs no Python; counts every GPU of the node), else 1 process (CPU; also when torch
# sees 0 GPUs). The system python3 is never asked: it may have no torch at all.
gpu_count() {
  local python=${1:-.venv/bin/python} n=""
  if n=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) \
      && [[ "$n" =~ ^[0-9]+$ ]]; then
    :
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if [[ "$n" =~ ^[0-9]+$ ]] && ((10#$n > 0)); then echo "$((10#$n))"; else echo 1; fi
}
