"""The MoE language model on one rank: attention against megatron's, routing, aux loss, counts."""
import pytest
import torch

from megatron_vlm.models.language import LanguageModelConfig, build_language_model, transformer_config
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.plan import total_params

SMALL = LanguageModelConfig(num_layers=3, dense_layers=[0], vocab_size=64)


def build(model_cfg=SMALL, **overrides):
    config = transformer_config(model_cfg, ParallelConfig(), "cpu", **overrides)
    return build_language_model(model_cfg, config, "cpu")


def test_core_attention_equals_megatron_dot_product_attention(single_rank_runtime):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_vlm.models.attention import CoreAttention

    config = transformer_config(SMALL, ParallelConfig(), "cpu")
    ours = CoreAttention(config, 1, AttnMaskType.causal, "self")
    theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    s, b = 12, 2
    q = torch.randn(s, b, SMALL.num_attention_heads, SMALL.head_dim)
    k = torch.randn(s, b, SMALL.num_query_groups, SMALL.head_dim)
    v = torch.randn(s, b, SMALL.num_query_groups, SMALL.head_dim)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    # fp32, same math in a different order (SDPA vs baddbmm + softmax): a few ulps.
    torch.testing.assert_close(ours(q, k, v, None), theirs(q, k, v, causal), atol=1e-6, rtol=1e-5)


def test_packed_sequences_attend_only_within_themselves(single_rank_runtime):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_vlm.models.attention import CoreAttention

    config = transformer_config(SMALL, ParallelConfig(), "cpu")
    attention = CoreAttention(config, 1, AttnMaskType.causal, "self")
    lengths = [5, 3, 7]
    cu = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    q = torch.randn(15, 1, SMALL.num_attention_heads, SMALL.head_dim)
    k = torch.randn(15, 1, SMALL.num_query_groups, SMALL.head_dim)
    v = torch.randn(15, 1, SMALL.num_query_groups, SMALL.head_dim)
    packed = attention(q, k, v, None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7))
    pieces, start = [], 0
    for n in lengths:
        pieces.append(attention(q[start:start + n], k[start:start + n], v[start:start + n], None))
        start += n
    torch.testing.assert_close(packed, torch.cat(pieces), atol=1e-6, rtol=1e-5)


def test_parameter_count_matches_the_planner(single_rank_runtime):
    for cfg in (SMALL, LanguageModelConfig(num_experts=None, num_layers=2),
                LanguageModelConfig(tie_word_embeddings=True, add_qkv_bias=True)):
        model = build(cfg)
        assert sum(p.numel() for p in model.parameters()) == total_params(cfg)[0]


def test_router_renormalises_top_k_like_qwen3(single_rank_runtime):
    model = build()
    router = model.decoder.layers[1].mlp.router
    hidden = torch.randn(10, 1, SMALL.hidden_size)
    probs, routing_map = router(hidden)
    # Qwen3 norm_topk_prob: softmax over all experts, keep the top k, renormalise.
    logits = hidden.reshape(10, -1) @ router.weight.t()
    full = torch.softmax(logits.float(), dim=-1)
    top, idx = full.topk(SMALL.moe_router_topk, dim=-1)
    expected = torch.zeros_like(full).scatter(1, idx, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    assert routing_map.sum(-1).eq(SMALL.moe_router_topk).all()


def test_aux_loss_reaches_the_router_gradient(single_rank_runtime):
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 8))
    pos = torch.arange(8)[None].expand(2, -1)
    grads = []
    for coeff in (0.0, 1.0):
        torch.manual_seed(5)
        cfg = LanguageModelConfig(num_layers=3, dense_layers=[0], vocab_size=64, aux_loss_coeff=coeff)
        model = build(cfg)
        model(tokens, pos, None, labels=tokens).sum().backward()
        grads.append(model.decoder.layers[1].mlp.router.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_attention_heads=6, num_query_groups=4), "multiple of model.num_query_groups"),
    (dict(num_experts=2, moe_router_topk=3), "exceeds model.num_experts"),
    (dict(dense_layers=[5]), "outside"),
    (dict(hidden_size=0), "model.hidden_size must be a positive integer"),
])
def test_bad_model_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LanguageModelConfig(**kwargs)
