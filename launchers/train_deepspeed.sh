#!/usr/bin/env bash
# DeepSpeed launcher. With a hostfile (one line per node: "node1 slots=8") it starts every node
# over ssh; without one it runs on this machine, one rank per local GPU (NUM_GPUS overrides).
#
#   HOSTFILE=launchers/hostfile launchers/train_deepspeed.sh --config launchers/configs/mistral7b_qlora_stage1.yaml
#   launchers/train_deepspeed.sh --config launchers/configs/mistral7b_qlora_stage1.yaml     # all local GPUs
#   NUM_GPUS=2 launchers/train_deepspeed.sh --config launchers/configs/tiny_cpu.yaml         # CPU ranks
#
# The launcher exports only some variables to the other nodes (PYTHON*, MLFLOW*, NCCL*, ...). For
# a hostfile run this script writes the rest that pcc_dist and Hugging Face read (PCC_*, HF_*,
# TRANSFORMERS_*, TOKENIZERS_*) into .deepspeed_env, which the launcher forwards to every node.
# HF_TOKEN is not written there (DeepSpeed logs the export lines): it goes into .hf_token (mode
# 600, on the shared checkout) and the nodes read it through HF_TOKEN_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH"
DEEPSPEED=${DEEPSPEED:-deepspeed}
PYTHON=${PYTHON:-.venv/bin/python}

# shellcheck source=launchers/_gpus.sh
source launchers/_gpus.sh

# .deepspeed_env: NAME=value lines of the variables above, secrets left out.
write_deepspeed_env() {
  local out=$1 name token=${HF_TOKEN:-${HUGGING_FACE_HUB_TOKEN:-}}
  (
    umask 077
    : >"$out"
    if [[ -n "$token" ]]; then
      printf '%s' "$token" >.hf_token
      echo "HF_TOKEN_PATH=$PWD/.hf_token" >>"$out"
    fi
    while IFS= read -r name; do
      case "$name" in
        HF_TOKEN | HUGGING_FACE_HUB_TOKEN) continue ;;
        HF_TOKEN_PATH) [[ -n "$token" ]] && continue ;;
      esac
      # A value with a newline cannot be one NAME=value line; the launcher would cut it.
      [[ "${!name}" == *$'\n'* ]] && continue
      echo "$name=${!name}" >>"$out"
    done < <(compgen -e | grep -E '^(PCC_|HF_|TRANSFORMERS_|TOKENIZERS_)' | sort)
  )
}

args=()
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  write_deepspeed_env .deepspeed_env
else
  args+=(--num_gpus "${NUM_GPUS:-$(gpu_count "$PYTHON")}")
fi
exec "$DEEPSPEED" "${args[@]}" --master_port "${MASTER_PORT:-29500}" launchers/train.py "$@"
