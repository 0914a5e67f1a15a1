"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`, e.g. Qwen3-VL-30B-A3B) on megatron-core.

Vision: transformers' `Qwen3VLMoeVisionModel` (Conv3d patch embed with temporal patch 2, learned
position embeddings interpolated to the grid, 2-D rotary, LayerNorm blocks, 2x2 merger, deepstack
mergers) on the first pipeline stage; see models/vlm.py for why. Language: the Qwen3-MoE stack of
models/language.py with interleaved M-RoPE and DeepStack.
"""
from __future__ import annotations

from transformers import Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

from megatron_vlm.models.qwen3_vl_moe import hf_adapter
from megatron_vlm.models.qwen_vl import Family


FAMILY = Family(
    architecture="Qwen3VLMoeForConditionalGeneration",
    hf_model_class=Qwen3VLMoeForConditionalGeneration,
    vision_class=Qwen3VLMoeVisionModel,
    mrope_interleaved=True,
    moe=True,
    hf_rules=hf_adapter.rules,
)
