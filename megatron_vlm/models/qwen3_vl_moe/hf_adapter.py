"""Qwen3-VL-MoE HF names <-> megatron names. Experts are stored fused (Hub layout, transposed)."""
from __future__ import annotations

from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel


def rules(hf_config) -> list:
    from megatron_vlm.models.qwen3_vl_moe.provider import FAMILY
    from megatron_vlm.models.qwen_vl import text_rules, vision_rules

    lm = FAMILY.language_config(hf_config)
    return text_rules(lm, fused_experts=True) + vision_rules(hf_config, Qwen3VLMoeVisionModel)
