"""Layer specs: Transformer Engine on GPU, megatron's local modules on CPU, chosen here only.

The CPU spec is megatron's own local GPT block spec with two substitutions: the norm becomes
`cpu_compat.SequenceParallelRMSNorm` (megatron's torch-norm fallback refuses sequence parallelism)
and the core attention becomes `models.attention.CoreAttention` (megatron's non-TE attention refuses
context parallelism and packed sequences). Everything else (dense/MoE layer pattern, pipeline
slicing) is megatron's code.
"""
from __future__ import annotations

import copy
import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_vlm.parallel.optional import transformer_engine_available


def use_transformer_engine(device_type: str) -> bool:
    return device_type == "cuda" and transformer_engine_available()


def decoder_block_spec(config, device_type: str, vp_stage=None, pp_rank=None):
    """The block spec for this pipeline stage's layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    te = use_transformer_engine(device_type)
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
