"""Layer specs: Transformer Engine on GPU, megatron's local modules on CPU, chosen here only.

`BackendConfig` (the config's `runtime.backend`) names the choice and the MoE speed switches, each
with a per-device default, and `transformer_config` resolves it once into the TransformerConfig
(`transformer_impl`, `moe_grouped_gemm`, `moe_permute_fusion`); the block spec follows
`transformer_impl`. On CUDA the Transformer Engine spec is the default and a missing or broken
Transformer Engine is an error carrying the import failure, never a silent fall back to the CPU
spec (dense-mask attention, no fused kernels); `layer_spec: local` asks for the local spec.

The CPU spec is megatron's own local GPT block spec with two substitutions: the norm becomes
`cpu_compat.SequenceParallelRMSNorm` (megatron's torch-norm fallback refuses sequence parallelism)
and the core attention becomes `models.attention.CoreAttention` (megatron's non-TE attention refuses
context parallelism and packed sequences). Everything else (dense/MoE layer pattern, pipeline
slicing) is megatron's code.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from megatron_vlm.parallel import optional

LAYER_SPECS = ("auto", "te", "local")


@dataclass(kw_only=True)
class BackendConfig:
    """Which megatron implementations build the model (`runtime.backend`). "auto" / None: per device."""
    layer_spec: str = "auto"                # auto: te on cuda, local on cpu | te | local
    moe_grouped_gemm: bool | None = None    # experts as one grouped GEMM (TEGroupedMLP); None: on
                                            # with the te spec (cuda), off with local (cpu)
    moe_permute_fusion: bool | None = None  # TE's fused token permute / unpermute; None: as above

    def __post_init__(self):
        if self.layer_spec not in LAYER_SPECS:
            raise ValueError(f"runtime.backend.layer_spec must be one of {list(LAYER_SPECS)}, "
                             f"got {self.layer_spec!r}")
        for name in ("moe_grouped_gemm", "moe_permute_fusion"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"runtime.backend.{name} must be true, false or null, "
                                 f"got {getattr(self, name)!r}")

    def resolve_layer_spec(self, device_type: str) -> str:
        """"te" or "local" for this device; "te" only with an importable Transformer Engine."""
        spec = self.layer_spec
        if spec == "auto":
            spec = "te" if device_type == "cuda" else "local"
        if spec == "te":
            if device_type != "cuda":
                raise ValueError(f"runtime.backend.layer_spec=te needs device cuda, got {device_type}")
            require_transformer_engine()
        return spec

    def transformer_config_kwargs(self, device_type: str) -> dict:
        """The TransformerConfig fields this backend sets, every default resolved for the device."""
        te = self.resolve_layer_spec(device_type) == "te"
        switches = {"moe_grouped_gemm": self.moe_grouped_gemm,
                    "moe_permute_fusion": self.moe_permute_fusion}
        for name, value in switches.items():
            if value and not te:  # the local spec's grouped GEMM is megatron's legacy GroupedMLP
                raise ValueError(f"runtime.backend.{name}=true needs the Transformer Engine layer "
                                 f"spec (runtime.backend.layer_spec: te, on cuda)")
        resolved = {name: te if value is None else value for name, value in switches.items()}
        return dict(transformer_impl="transformer_engine" if te else "local", **resolved)


def require_transformer_engine() -> None:
    error = optional.transformer_engine_import_error()
    if error is not None:
        raise RuntimeError(
            f"Transformer Engine does not import ({type(error).__name__}: {error}); on cuda the "
            f"model needs it (pip install megatron_vlm[gpu]), or set runtime.backend.layer_spec: "
            f"local for megatron's local spec (slower: no fused attention)") from error


def decoder_block_spec(config, device_type: str, vp_stage=None, pp_rank=None):
    """The block spec for this pipeline stage's layers, as `config.transformer_impl` chose it."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    te = config.transformer_impl == "transformer_engine"
    if te and device_type != "cuda":
        raise ValueError(f"the model config asks for Transformer Engine on {device_type}: build it "
                         f"with models.language.transformer_config for this device")
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=te, normalization="RMSNorm",
                                      vp_stage=vp_stage, pp_rank=pp_rank)
    return spec if te else _substitute_cpu_modules(spec)


def _cpu_replacements() -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_vlm.models.attention import CoreAttention
    from megatron_vlm.parallel.cpu_compat import SequenceParallelRMSNorm

    return {WrappedTorchNorm: SequenceParallelRMSNorm, DotProductAttention: CoreAttention}


def _substitute_cpu_modules(spec):
    from megatron.core.transformer.spec_utils import ModuleSpec

    replacements = _cpu_replacements()

    def visit(node):
        if isinstance(node, type):
            return replacements.get(node, node)
        if isinstance(node, ModuleSpec):
            node = copy.copy(node)
            node.module = visit(node.module)
            node.submodules = visit(node.submodules)
            return node
        if isinstance(node, list):
            return [visit(item) for item in node]
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            changes = {f.name: visit(getattr(node, f.name)) for f in dataclasses.fields(node)
                       if f.init}
            return dataclasses.replace(node, **changes)
        return node

    return visit(spec)
