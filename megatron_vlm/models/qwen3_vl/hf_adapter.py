"""Qwen3-VL (dense) HF names <-> megatron names."""
from __future__ import annotations

from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel


def rules(hf_config) -> list:
    from megatron_vlm.models.qwen3_vl.provider import FAMILY
    from megatron_vlm.models.qwen_vl import text_rules, vision_rules

    return (text_rules(FAMILY.language_config(hf_config), fused_experts=False)
            + vision_rules(hf_config, Qwen3VLVisionModel))
