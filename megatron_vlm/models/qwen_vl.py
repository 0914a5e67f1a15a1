"""What the Qwen-VL families share: HF config -> our configs, and building the megatron VLM.

Each family folder (qwen3_vl_moe/, qwen3_vl/, qwen2_5_vl/) declares a `Family` with its HF
classes and differences (M-RoPE layout, deepstack, how to read image features) in provider.py,
and its weight-name rules in hf_adapter.py. Nothing here branches on the family.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from megatron_vlm.models.language import LanguageModelConfig, transformer_config
from megatron_vlm.parallel.config import ParallelConfig

# megatron_vlm.models.vlm (megatron-core, ~2-3 s to import) is imported where a model is built:
# `megatron-vlm train` checks a config's layout against the family's HF config in the launcher
# process before any rank starts, and needs none of megatron for that.


@dataclass(frozen=True)
class Family:
    architecture: str                       # HF `architectures[0]`
    hf_model_class: Callable                # transformers class of the full model
    vision_class: Callable                  # transformers class of the vision tower
    mrope_interleaved: bool
    moe: bool
    qk_layernorm: bool = True               # Qwen3 q/k RMSNorm
    qkv_bias: bool = False                  # Qwen2.5 QKV bias
    hf_rules: Callable = field(repr=False, default=None)  # hf_config -> list[checkpoint.hf_rules.Rule]

    def language_config(self, hf_config) -> LanguageModelConfig:
        return language_config_from_hf(hf_config, self)

    def vision_spec(self, hf_config) -> VisionSpec:
        from megatron_vlm.models.vlm import VisionSpec

        text = hf_config.text_config
        vision_config = hf_config.vision_config
        return VisionSpec(
            build_vision=partial(build_vision_tower, self.vision_class, vision_config),
            image_features=vision_features,
            image_token_id=hf_config.image_token_id,
            spatial_merge_size=vision_config.spatial_merge_size,
            mrope_section=list(text.rope_parameters["mrope_section"]),
            mrope_interleaved=self.mrope_interleaved,
            num_deepstack=len(getattr(vision_config, "deepstack_visual_indexes", None) or []),
        )

    def vision_parameters(self, hf_config) -> int:
        """Parameters of the vision tower, built on the meta device (no memory, no init)."""
        with torch.device("meta"):
            vision = self.vision_class._from_config(hf_config.vision_config)
        return sum(p.numel() for p in vision.parameters())

    def build(self, hf_config, parallel: ParallelConfig, device_type: str,
              params_dtype: torch.dtype = torch.float32, pre_process=None, post_process=None,
              **config_overrides) -> VisionLanguageModel:
        from megatron_vlm.models.vlm import VisionLanguageModel

        lm = self.language_config(hf_config)
        vision = self.vision_spec(hf_config)
        # apply_rope_fusion off: the fused THD kernel indexes rotary frequencies by position within
        # each packed sequence, which is wrong for 3-D M-RoPE ids (they jump after images).
        config = transformer_config(lm, parallel, device_type, params_dtype,
                                    mrope_section=vision.mrope_section,
                                    **{"apply_rope_fusion": False, **config_overrides})
        return VisionLanguageModel(lm, vision, config, device_type, pre_process, post_process)


def build_vision_tower(vision_class, vision_config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' vision tower, parameters and buffers built directly on `device` in `dtype`
    (the buffers transformers creates in fp32 on purpose, the rotary `inv_freq`, stay fp32 as
    there). On a copy of the config: `_from_config` writes the dtype into the config it is given."""
    with torch.device(device):
        return vision_class._from_config(copy.deepcopy(vision_config), dtype=dtype)


def vision_features(vision, pixel_values, image_grid_thw):
    """(merged features [n_image_tokens, H], deepstack features) from a Qwen-VL vision tower."""
    out = vision(pixel_values.to(vision.dtype), grid_thw=image_grid_thw, return_dict=True)
    return out.pooler_output, list(getattr(out, "deepstack_features", None) or [])


# LanguageModelConfig field -> the HF text_config key it is read from (layout errors name the key)
HF_TEXT_FIELDS = {"num_layers": "num_hidden_layers", "num_query_groups": "num_key_value_heads",
                  "num_experts": "num_experts", "ffn_hidden_size": "intermediate_size",
                  "moe_ffn_hidden_size": "moe_intermediate_size", "vocab_size": "vocab_size"}


def language_config_from_hf(hf_config, family: Family) -> LanguageModelConfig:
    text, moe = hf_config.text_config, family.moe
    rope = text.rope_parameters
    dense_layers: list[int] = []
    if moe:
        step = text.decoder_sparse_step
        dense_layers = [i for i in range(text.num_hidden_layers)
                        if i in text.mlp_only_layers or (i + 1) % step != 0]
    return LanguageModelConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        ffn_hidden_size=text.intermediate_size,
        num_experts=text.num_experts if moe else None,
        moe_ffn_hidden_size=text.moe_intermediate_size if moe else 1,
        moe_router_topk=text.num_experts_per_tok if moe else 1,
        norm_topk_prob=getattr(text, "norm_topk_prob", True),
        dense_layers=dense_layers, aux_loss_coeff=getattr(text, "router_aux_loss_coef", 0.0) if moe else 0.0,
        rotary_base=float(rope["rope_theta"]), norm_eps=text.rms_norm_eps,
        qk_layernorm=family.qk_layernorm,
        add_qkv_bias=family.qkv_bias or bool(getattr(text, "attention_bias", False)),
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        max_position_embeddings=text.max_position_embeddings,
    )


def vision_rules(hf_config, vision_class, hf_prefix: str = "model.visual.") -> list:
    """Identity rules for every vision-tower tensor (the tower is transformers' own module)."""
    from megatron_vlm.checkpoint.hf_rules import same

    with torch.device("meta"):
        vision = vision_class._from_config(hf_config.vision_config)
    return [same(hf_prefix + name, "vision." + name) for name in vision.state_dict()]


def text_rules(lm: LanguageModelConfig, fused_experts: bool, hf_prefix: str = "model.language_model.") -> list:
    """The Qwen text stack's HF names -> megatron names (local spec, TP=PP=EP=1)."""
    from megatron_vlm.checkpoint import hf_rules as r

    rules = [r.same(hf_prefix + "embed_tokens.weight", "language.embedding.word_embeddings.weight"),
             r.same(hf_prefix + "norm.weight", "language.decoder.final_layernorm.weight")]
    if not lm.tie_word_embeddings:
        rules.append(r.same("lm_head.weight", "language.output_layer.weight"))
    heads = (lm.num_attention_heads, lm.num_query_groups, lm.head_dim)
    for i in range(lm.num_layers):
        hf, mc = f"{hf_prefix}layers.{i}.", f"language.decoder.layers.{i}."
        attn = hf + "self_attn."
        rules += [r.same(hf + "input_layernorm.weight", mc + "input_layernorm.weight"),
                  r.same(hf + "post_attention_layernorm.weight", mc + "pre_mlp_layernorm.weight"),
                  r.qkv(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight",
                        mc + "self_attention.linear_qkv.weight", *heads),
                  r.same(attn + "o_proj.weight", mc + "self_attention.linear_proj.weight")]
        if lm.add_qkv_bias:
            rules.append(r.qkv(attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias",
                               mc + "self_attention.linear_qkv.bias", *heads))
        if lm.qk_layernorm:
            rules += [r.same(attn + "q_norm.weight", mc + "self_attention.q_layernorm.weight"),
                      r.same(attn + "k_norm.weight", mc + "self_attention.k_layernorm.weight")]
        if lm.moe_layer_pattern[i]:
            rules += expert_rules(lm, hf + "mlp.", mc + "mlp.", fused_experts)
        else:
            rules += [r.gate_up(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight",
                                mc + "mlp.linear_fc1.weight"),
                      r.same(hf + "mlp.down_proj.weight", mc + "mlp.linear_fc2.weight")]
    return rules


def expert_rules(lm: LanguageModelConfig, hf: str, mc: str, fused: bool) -> list:
    from megatron_vlm.checkpoint import hf_rules as r

    experts = range(lm.num_experts)
    fc1 = [f"{mc}experts.local_experts.{e}.linear_fc1.weight" for e in experts]
    fc2 = [f"{mc}experts.local_experts.{e}.linear_fc2.weight" for e in experts]
    rules = [r.same(hf + "gate.weight", mc + "router.weight")]
    if fused:
        h, i = lm.hidden_size, lm.moe_ffn_hidden_size
        return rules + [r.fused_experts(hf + "experts.gate_up_proj", fc1, (2 * i, h)),
                        r.fused_experts(hf + "experts.down_proj", fc2, (h, i))]
    for e in experts:
        rules += [r.gate_up(f"{hf}experts.{e}.gate_proj.weight", f"{hf}experts.{e}.up_proj.weight", fc1[e]),
                  r.same(f"{hf}experts.{e}.down_proj.weight", fc2[e])]
    return rules
