"""Packing: pack / unpack against the reference, plans within budget and balanced, THD semantics."""
import random

import pytest
import torch

from kernels.bench.packing import long_tailed_lengths
from kernels.packing import (PackCost, cu_seqlens_from_lengths, karmarkar_karp, mrope_position_ids, pack, plan_packs,
                             position_ids, sample_costs, thd_params, unpack)
from kernels.reference import pack_ref, thd_attention_mask_ref, unpack_ref
from tests.utils import assert_close

IMPLS = ["torch", "triton"]
LENGTHS = torch.tensor([5, 1, 17, 33, 0, 8])  # an empty sample and one of a single token


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trailing,dtype", [((), torch.int64), ((300,), torch.float32), ((3, 7), torch.bfloat16)])
def test_pack_unpack_round_trip_is_exact(impl, trailing, dtype):
    # 300 columns: more than one BLOCK_COLS step, not a multiple of it
    padded = (torch.randn(len(LENGTHS), 40, *trailing) * 100).to(dtype)
    cu, _ = cu_seqlens_from_lengths(LENGTHS)
    packed = pack(padded, cu, impl=impl)
    assert torch.equal(packed, pack_ref(padded, LENGTHS))
    restored = unpack(packed, cu, 40, impl=impl)
    assert torch.equal(restored, unpack_ref(packed, cu, 40))
    assert torch.equal(pack(restored, cu, impl=impl), packed)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_and_unpack_are_each_others_gradient(impl):
    cu, _ = cu_seqlens_from_lengths(LENGTHS)
    padded = torch.randn(len(LENGTHS), 40, 4, requires_grad=True)
    upstream = torch.randn(int(cu[-1]), 4)
    (pack(padded, cu, impl=impl) * upstream).sum().backward()
    assert torch.equal(padded.grad, unpack_ref(upstream, cu, 40))
    packed = torch.randn(int(cu[-1]), 4, requires_grad=True)
    upstream = torch.randn(len(LENGTHS), 40, 4)
    (unpack(packed, cu, 40, fill=-1.0, impl=impl) * upstream).sum().backward()
    assert torch.equal(packed.grad, pack_ref(upstream, LENGTHS))


def _check_plan(plan, lengths, budget, dp):
    assert len(plan.microbatches) == dp
    assert len({len(rank) for rank in plan.microbatches}) == 1, "ranks need the same micro-batch count"
    seen = sorted(i for rank in plan.microbatches for mb in rank for i in mb)
    assert seen == list(range(len(lengths))), "every sample exactly once"
    for rank in plan.microbatches:
        for mb in rank:
            assert sum(lengths[i] for i in mb) <= budget


def test_long_tailed_plan_fills_97_percent_and_balances_dp_ranks():
    # The benchmark's scenario: 4096 lognormal samples (mean 800, max 8192), budget 16384, DP=8.
    for image_fraction in (0.0, 0.3):
        lengths, images = long_tailed_lengths(4096, 800, 8192, image_fraction)
        plan = plan_packs(lengths, 16384, dp_size=8, image_tokens=images)
        _check_plan(plan, lengths, 16384, 8)
        stats = plan.stats(lengths, sample_costs(lengths, images))
        assert stats["fill_vs_budget"] >= 0.97, stats
        assert stats["dp_imbalance"] <= 1.02, stats


@pytest.mark.parametrize("seed", range(5))
def test_random_plans_stay_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 3000) for _ in range(rng.randint(1, 200))]
    dp = rng.randint(1, 4)
    _check_plan(plan_packs(lengths, 4096, dp_size=dp), lengths, 4096, dp)


def test_cost_counts_attention_and_image_tokens():
    cost = PackCost(hidden_size=1024, image=2.0)
    assert cost(1000) == pytest.approx(1000 + 1000**2 / (12 * 1024))
    assert cost(1000, image_tokens=300) == pytest.approx(cost(1000) + 600)
    # one long sample costs more than the same tokens in short ones: balancing must see that
    assert cost(8192) > 8 * cost(1024)


def test_oversized_sample_is_rejected():
    with pytest.raises(ValueError, match="token_budget"):
        plan_packs([100, 5000], 4096)


def test_karmarkar_karp_balances_random_costs():
    rng = random.Random(0)
    costs = [rng.lognormvariate(6, 1) for _ in range(1000)]
    parts = karmarkar_karp(costs, 8)
    assert sorted(i for p in parts for i in p) == list(range(1000))
    sums = [sum(costs[i] for i in p) for p in parts]
    assert max(sums) / (sum(sums) / 8) < 1.001


# ------------------------------------------------------------------------------ THD layout
def test_cu_seqlens_positions_and_packed_seq_params():
    cu, cu_padded = cu_seqlens_from_lengths([3, 1, 4], pad_to_multiple=4)
    assert cu.tolist() == [0, 3, 4, 8] and cu_padded.tolist() == [0, 4, 8, 12]
    assert cu.dtype == torch.int32  # what TE / flash-attn varlen kernels take
    assert position_ids(cu).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    params = thd_params(cu, cu_padded)
    assert params["qkv_format"] == "thd" and params["max_seqlen_q"] == 4
    packed_seq_params = pytest.importorskip("megatron.core.packed_seq_params")
    assert packed_seq_params.PackedSeqParams(**params).cu_seqlens_kv_padded is cu_padded


def test_mrope_positions_text_and_image():
    text_only = mrope_position_ids([[5], [3]])
    assert torch.equal(text_only, position_ids(torch.tensor([0, 5, 8])).expand(3, 8))
    # 2 text tokens, a 1 x 2 x 3 image grid, 2 text tokens (Qwen2-VL get_rope_index layout)
    pos = mrope_position_ids([[2, (1, 2, 3), 2]])
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                            [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                            [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]


def test_thd_mask_is_per_sample_causal_attention():
    # Attention over the packed tokens with the THD mask equals attention run on each sample alone.
    cu, _ = cu_seqlens_from_lengths([4, 1, 6])
    q, k, v = torch.randn(3, 11, 8).unbind(0)
    masked_out = thd_attention_mask_ref(cu)
    packed = torch.softmax((q @ k.t()).masked_fill(masked_out, float("-inf")), -1) @ v
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        alone = torch.softmax((q[s:e] @ k[s:e].t()).masked_fill(~causal, float("-inf")), -1) @ v[s:e]
        assert_close(packed[s:e], alone, atol=1e-6, rtol=1e-6, name=f"sample at {s}")
