"""The Qwen3-MoE-style language model on megatron-core: config and provider.

This is the language half of every VLM family here (Qwen3-VL-MoE uses exactly this text stack:
GQA, q/k RMSNorm, RMSNorm, rotary embeddings, SwiGLU experts with softmax top-k routing and
renormalised weights, optional dense layers, optional tied embeddings, load-balancing aux loss).
The provider knows nothing about a family: families (models/qwen3_vl/...) translate their HF config
into `LanguageModelConfig` and add their own parts (vision tower, M-RoPE).

Qwen3's `norm_topk_prob=True` (softmax over all experts, keep top-k, renormalise) equals megatron's
`moe_router_pre_softmax=False` (top-k of the logits, softmax over those k); `norm_topk_prob=False`
is `moe_router_pre_softmax=True`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_vlm.models.specs import BackendConfig
from megatron_vlm.parallel.config import ParallelConfig


@dataclass(kw_only=True)
class LanguageModelConfig:
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2          # GQA key/value heads
    head_dim: int = 16
    ffn_hidden_size: int = 96          # dense-MLP layers
    num_experts: int | None = 4        # None: a dense model
    moe_ffn_hidden_size: int = 48      # per expert; differs from hidden_size on purpose in tests
    moe_router_topk: int = 2
    norm_topk_prob: bool = True
    dense_layers: list[int] = field(default_factory=list)  # Qwen3 `mlp_only_layers`
    aux_loss_coeff: float = 0.0        # Qwen3 router_aux_loss_coef (0.001 in released configs)
    rotary_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    qk_layernorm: bool = True
    add_qkv_bias: bool = False         # Qwen2.5 has QKV bias
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    init_method_std: float = 0.02

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                    "num_query_groups", "head_dim", "ffn_hidden_size", "moe_ffn_hidden_size",
                    "moe_router_topk", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of model.num_query_groups ({self.num_query_groups})")
        if self.num_experts is not None:
            if self.num_experts < 1:
                raise ValueError(f"model.num_experts must be >= 1 or null, got {self.num_experts}")
            if self.moe_router_topk > self.num_experts:
                raise ValueError(f"model.moe_router_topk ({self.moe_router_topk}) exceeds "
                                 f"model.num_experts ({self.num_experts})")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"model.dense_layers has indices outside [0, {self.num_layers}): {bad}")
        if self.aux_loss_coeff < 0:
            raise ValueError(f"model.aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")

    @property
    def moe_layer_pattern(self) -> list[int]:
        """1 for an MoE layer, 0 for dense, per layer (megatron's moe_layer_freq list)."""
        if self.num_experts is None:
            return [0] * self.num_layers
        return [0 if i in self.dense_layers else 1 for i in range(self.num_layers)]

    def check_layout(self, parallel: ParallelConfig, names: dict[str, str] | None = None) -> None:
        """Raise, naming the field, when the parallel layout does not divide this model. `names`:
        how the config the model came from calls a field (default `model.<field>`)."""
        def name(field_name: str) -> str:
            return (names or {}).get(field_name, f"model.{field_name}")

        if self.num_layers % parallel.pp:
            raise ValueError(f"{name('num_layers')} ({self.num_layers}) is not divisible by "
                             f"parallel.pp ({parallel.pp})")
        if self.num_query_groups % parallel.tp:
            raise ValueError(f"{name('num_query_groups')} ({self.num_query_groups}) is not divisible"
                             f" by parallel.tp ({parallel.tp})")
        if self.vocab_size % parallel.tp:  # megatron splits the embedding and the output layer by vocabulary
            raise ValueError(f"{name('vocab_size')} ({self.vocab_size}) is not divisible by parallel.tp "
                             f"({parallel.tp})")
        if self.num_experts is not None and self.num_experts % parallel.ep:
            raise ValueError(f"parallel.ep ({parallel.ep}) does not divide {name('num_experts')} "
                             f"({self.num_experts})")
        if self.num_experts is None and parallel.ep > 1:
            raise ValueError(f"parallel.ep={parallel.ep} needs an MoE model ({name('num_experts')})")
        if self.ffn_hidden_size % parallel.tp:
            raise ValueError(f"{name('ffn_hidden_size')} ({self.ffn_hidden_size}) is not divisible "
                             f"by parallel.tp ({parallel.tp})")
        if self.num_experts is not None and self.moe_ffn_hidden_size % parallel.expert_tp:
            raise ValueError(f"{name('moe_ffn_hidden_size')} ({self.moe_ffn_hidden_size}) is not "
                             f"divisible by parallel.etp ({parallel.expert_tp})")


def transformer_config(model: LanguageModelConfig, parallel: ParallelConfig, device_type: str,
                       params_dtype: torch.dtype = torch.float32, backend: BackendConfig | None = None,
                       **overrides):
    """megatron TransformerConfig for this model and layout. `backend` (default: every choice per
    device) picks the layer spec and the MoE speed switches. On CPU, config switches that avoid
    CUDA-only paths are set here (preferred over patches, see parallel/cpu_compat.py)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    model.check_layout(parallel)
    moe = model.num_experts is not None
    kwargs = dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim, ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=model.norm_eps, qk_layernorm=model.qk_layernorm,
        add_bias_linear=False, add_qkv_bias=model.add_qkv_bias, gated_linear_unit=True,
        activation_func=F.silu, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=model.init_method_std, params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=parallel.tp, pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp, expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
        sequence_parallel=parallel.use_sequence_parallel,
        # Pipeline stages exchange shapes first, so packed micro-batches may differ in length;
        # megatron's allgather dispatcher refuses this, so with it every micro-batch is one length.
        pipeline_dtype=params_dtype,
        variable_seq_lengths=parallel.token_dispatcher != "allgather",
        moe_token_dispatcher_type=parallel.token_dispatcher,  # megatron checks it even when dense
    )
    if moe:
        kwargs.update(
            num_moe_experts=model.num_experts, moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_router_topk=model.moe_router_topk, moe_router_pre_softmax=not model.norm_topk_prob,
            moe_router_score_function="softmax", moe_layer_freq=model.moe_layer_pattern,
            moe_router_load_balancing_type="aux_loss" if model.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=model.aux_loss_coeff,
            moe_router_dtype="fp32",
        )
    kwargs.update((backend or BackendConfig()).transformer_config_kwargs(device_type))
    if device_type == "cpu":
        kwargs.update(cpu_safe_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def cpu_safe_overrides() -> dict:
    """Config switches that keep megatron off CUDA-only code paths (instead of patches)."""
    return dict(
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, moe_router_fusion=False,
        batch_p2p_sync=False,  # moe_grouped_gemm / moe_permute_fusion: off by BackendConfig on cpu
    )


def build_language_model(model: LanguageModelConfig, config, device_type: str,
                         pre_process: bool | None = None, post_process: bool | None = None,
                         vp_stage=None, position_embedding_type: str = "rope", **gpt_kwargs):
    """A megatron GPTModel for this pipeline stage (stage flags default from parallel_state)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from megatron_vlm.models.specs import decoder_block_spec

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None,
                                                             vp_stage=vp_stage)
    return GPTModel(
        config=config, transformer_layer_spec=decoder_block_spec(config, device_type, vp_stage),
        vocab_size=model.vocab_size, max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type=position_embedding_type, rotary_base=int(model.rotary_base),
        vp_stage=vp_stage, **gpt_kwargs,
    )
