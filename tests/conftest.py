"""Test-wide setup.

TRITON_INTERPRET must be in the environment before any `@triton.jit` decorator runs (Triton reads it
at decoration time), so it is set here, before any test module imports a kernel. On a machine with
CUDA the real kernels run instead.
"""
import os

import pytest
import torch

import megatron_vlm  # noqa: F401  first: with the vLLM extra, transformers' image code needs the
                     # torchvision schemas it defines (rollout/vllm_cpu_compat.py)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Two cores: tests that use torch inside one process should not oversubscribe them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def single_rank_runtime():
    """torch.distributed + megatron parallel_state for one rank in the pytest process (TP=1).

    Tests that need another layout use multi-process launches instead; a test that changes the
    layout with `set_layout` must restore it.
    """
    from megatron_vlm.parallel.config import ParallelConfig
    from megatron_vlm.parallel.runtime import init_runtime

    return init_runtime(ParallelConfig(), seed=11)
