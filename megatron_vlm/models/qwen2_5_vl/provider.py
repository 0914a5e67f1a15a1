"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) on megatron-core.

Vision: transformers' Qwen2.5-VL tower (RMSNorm blocks with gated MLP, window attention with a few
full-attention blocks, 2x2 merger), no DeepStack. Language: dense Qwen2 stack with QKV bias and no
q/k norm, contiguous M-RoPE sections.
"""
from __future__ import annotations

from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from megatron_vlm.models.qwen2_5_vl import hf_adapter
from megatron_vlm.models.qwen_vl import Family


FAMILY = Family(
    architecture="Qwen2_5_VLForConditionalGeneration",
    hf_model_class=Qwen2_5_VLForConditionalGeneration,
    vision_class=Qwen2_5_VisionTransformerPretrainedModel,
    mrope_interleaved=False,
    moe=False,
    qk_layernorm=False,
    qkv_bias=True,
    hf_rules=hf_adapter.rules,
)
