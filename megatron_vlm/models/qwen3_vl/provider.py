"""Qwen3-VL dense (`Qwen3VLForConditionalGeneration`, e.g. Qwen3-VL-8B) on megatron-core.

Same vision tower design and DeepStack as Qwen3-VL-MoE (see models/vlm.py); the language model is
the dense Qwen3 stack (SwiGLU MLP in every layer), interleaved M-RoPE.
"""
from __future__ import annotations

from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from megatron_vlm.models.qwen3_vl import hf_adapter
from megatron_vlm.models.qwen_vl import Family


FAMILY = Family(
    architecture="Qwen3VLForConditionalGeneration",
    hf_model_class=Qwen3VLForConditionalGeneration,
    vision_class=Qwen3VLVisionModel,
    mrope_interleaved=True,
    moe=False,
    hf_rules=hf_adapter.rules,
)
