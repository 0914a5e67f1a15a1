#!/usr/bin/env bash
# GPU smoke test: one command on a fresh GPU machine (CUDA torch and Triton installed) that proves
# the GPU path in under 8 minutes on one H100 / H200: installs from a folder of wheels, checks the
# imports, the Triton kernels against the reference (fp32, bf16), the kernel benchmark, and an SFT +
# GRPO step of the digits demo VLM at world size 1 on NCCL (embedded engine; vLLM where installed).
# Ends with one table (stage | status | figure | seconds); exit 1 if a stage failed, 2 without a GPU.
#
#   WHEELS=/path/to/wheels bash launch/gpu_smoke.sh          # or --wheels DIR; --out DIR keeps the logs
#   bash launch/gpu_smoke.sh --dry-run                       # or SMOKE_DRY_RUN=1: print the commands
#
# PYTHON picks the interpreter (default: python, else python3): the one whose CUDA torch is tested.
# The stages are in launch/gpu_smoke.py (standard library only: it runs before anything is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
[ -n "$PYTHON" ] || { echo "gpu_smoke: no python found (set PYTHON)" >&2; exit 2; }
command -v timeout >/dev/null || { echo "gpu_smoke: coreutils 'timeout' is needed to bound each stage" >&2; exit 2; }
exec "$PYTHON" launch/gpu_smoke.py "$@"
