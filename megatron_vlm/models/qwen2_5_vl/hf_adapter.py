"""Qwen2.5-VL HF names <-> megatron names (QKV bias regrouped like the QKV weight)."""
from __future__ import annotations

from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel


def rules(hf_config) -> list:
    from megatron_vlm.models.qwen2_5_vl.provider import FAMILY
    from megatron_vlm.models.qwen_vl import text_rules, vision_rules

    return (text_rules(FAMILY.language_config(hf_config), fused_experts=False)
            + vision_rules(hf_config, Qwen2_5_VisionTransformerPretrainedModel))
