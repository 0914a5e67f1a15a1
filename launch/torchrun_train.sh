#!/usr/bin/env bash
# One node: torchrun starts NPROC ranks of `megatron-vlm train` (GPUs: NCCL; CPU: gloo).
#
#   NPROC=8 bash launch/torchrun_train.sh configs/lm_demo.yaml [key.sub=value ...]
#
# MEGATRON_VLM_DRY_RUN=1 prints the command instead of running it (used by the tests).
set -euo pipefail
CONFIG=${1:?usage: launch/torchrun_train.sh CONFIG [key=value ...]}
shift
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-$(id -u)}
cmd=(torchrun --standalone --nproc-per-node="$NPROC" --master-port="$MASTER_PORT"
     -m megatron_vlm.cli train --config "$CONFIG" "$@")
if [ "${MEGATRON_VLM_DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
