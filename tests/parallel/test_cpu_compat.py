"""Each CPU compatibility patch is needed: without it, the megatron site it names fails.

Every case starts fresh ranks with all patches but one (patches cannot be undone inside a process)
and runs the smallest scenario reaching that site. With all patches, the same scenarios are part of
test_equivalence.py.
"""
import json
import os

import pytest
import torch

from megatron_vlm.parallel import cpu_compat
from megatron_vlm.parallel.launch import launch_local

WORKER = os.path.join(os.path.dirname(__file__), "compat_worker.py")

# site -> (ranks, text of the error megatron raises without the patch)
EXPECTED = {
    "current_device": (1, "Torch not compiled with CUDA"),
    "rng_tracker": (1, "Torch not compiled with CUDA"),
    "te_general_gemm": (1, "name 'te_general_gemm' is not defined"),
    "alltoall_dispatcher": (1, "torch.cuda.Stream requires CUDA"),
    "cuda_factories": (1, "Torch not compiled with CUDA"),
    "cuda_type_names": (1, "Wrapped parameters must be one of"),
    "cuda_synchronize": (2, "Torch not compiled with CUDA"),
    "rope_cp": (2, "pin_memory=True requires"),
    "uneven_collectives": (4, "ProcessGroupGloo::allgather: invalid tensor size"),
    "tied_embedding_sync": (2, "Torch not compiled with CUDA"),
}


def test_every_patch_has_a_failure_case():
    assert set(EXPECTED) == set(cpu_compat.PATCHES)


@pytest.mark.dist
@pytest.mark.parametrize("site", list(EXPECTED))
def test_site_fails_without_its_patch(site, tmp_path):
    nproc, message = EXPECTED[site]
    prefix = tmp_path / site
    result = launch_local([WORKER, site, str(prefix)], nproc=nproc, timeout=180)
    assert not result.timed_out, result.summary()
    errors = [json.loads((tmp_path / f"{site}.{r}.json").read_text())["error"]
              for r in range(nproc) if (tmp_path / f"{site}.{r}.json").exists()]
    assert errors, result.summary()
    assert any(e and message in e for e in errors), errors


def test_megatron_torch_norm_refuses_sequence_parallel_and_ours_marks_the_weight():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               normalization="RMSNorm", tensor_model_parallel_size=2,
                               sequence_parallel=True, use_cpu_initialization=True)
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(config, 8)
    norm = cpu_compat.SequenceParallelRMSNorm(config, 8, eps=1e-6)
    assert norm.weight.sequence_parallel is True
    x = torch.randn(3, 8)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
