#!/usr/bin/env bash
# Set up megatron_vlm in ./.venv on a CPU machine (the quick start's first half).
# torch comes first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
if [ "${WITH_VLLM_CONTRACT:-0}" = 1 ]; then  # CI: the vLLM contract test runs instead of skipping
  .venv/bin/python -m pip install --quiet --no-deps -r launch/vllm-contract-requirements.txt
fi
.venv/bin/python -W ignore -c "import torch, megatron.core, transformers, triton; print('megatron_vlm ready:', 'torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
