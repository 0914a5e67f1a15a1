"""Advantage estimators against hand computation, and the registry contract."""
import math

import pytest
import torch

from megatron_vlm.rl.advantages import (ADVANTAGES, AdvantageConfig, AdvantageInputs, compute_advantages,
                                        get_advantage, group_index_from_ids, register_advantage)
from megatron_vlm.rl.tokens import flatten_padded


def _inputs(rewards, groups, lengths, masked=()):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()))
    mask = torch.ones(int(cu[-1]))
    for t in masked:
        mask[t] = 0
    return AdvantageInputs(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups), mask, cu)


def _per_sequence(adv, inputs):
    """The single value on each sequence's unmasked tokens (asserting it is constant)."""
    out = []
    for i in range(len(inputs.cu_seqlens) - 1):
        s, e = int(inputs.cu_seqlens[i]), int(inputs.cu_seqlens[i + 1])
        values = adv[s:e][inputs.mask[s:e].bool()]
        assert torch.all(values == values[0])
        out.append(float(values[0]))
    return out


def test_grpo_by_hand():
    # group 0: rewards 1, 0, 0, 1 (interleaved with group 1); group 1: 0.1 x 3; group 2: a single response
    inputs = _inputs([1, 0.1, 0, 0.1, 0, 0.1, 1, 2.0], [0, 1, 0, 1, 0, 1, 0, 2], [2, 3, 1, 2, 4, 1, 2, 3], masked=(1,))
    adv = compute_advantages(inputs, AdvantageConfig(estimator="grpo"))
    std = math.sqrt(4 * 0.25 / 3)  # unbiased
    a = 0.5 / (std + 1e-6)
    assert _per_sequence(adv, inputs) == pytest.approx([a, 0, -a, 0, -a, 0, a, 2 / (1 + 1e-6)], abs=1e-6)
    assert adv[1] == 0  # masked token
    assert adv.dtype == torch.float32 and adv.shape == (18,)


def test_equal_rewards_give_exact_zero():
    # 0.1 three times: a float32 mean may round; the result must still be exactly 0, not 1e-3-ish
    for estimator in ("grpo", "rloo"):
        inputs = _inputs([0.1, 0.1, 0.1, 0.7, 0.7], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1])
        assert torch.all(compute_advantages(inputs, AdvantageConfig(estimator=estimator)) == 0)


def test_dr_grpo_is_mean_centred_without_std():
    inputs = _inputs([1, 0, 0, 3.0], [0, 0, 0, 0], [1, 2, 1, 1])
    adv = compute_advantages(inputs, AdvantageConfig(estimator="grpo", norm_by_std=False))
    assert _per_sequence(adv, inputs) == pytest.approx([0, -1, -1, 2])


def test_rloo_is_leave_one_out_baseline():
    inputs = _inputs([1, 0, 0, 5.0], [0, 0, 0, 1], [1, 1, 2, 1])
    adv = compute_advantages(inputs, AdvantageConfig(estimator="rloo"))
    assert _per_sequence(adv, inputs) == pytest.approx([1 - 0, 0 - 0.5, 0 - 0.5, 5.0])


def test_reinforce_pp_baseline_whitens_over_tokens():
    # group 0: rewards 1, 0 (lengths 1, 3); group 1: rewards 2, 2 (lengths 2, 1, one token masked)
    inputs = _inputs([1, 0, 2, 2.0], [0, 0, 1, 1], [1, 3, 2, 1], masked=(5,))
    adv = compute_advantages(inputs, AdvantageConfig(estimator="reinforce_pp_baseline"))
    centred = [0.5, -0.5, -0.5, -0.5, 0, 0]  # the six unmasked tokens: 1 + 3 + 1 + 1
    mean = sum(centred) / 6
    var = sum((c - mean) ** 2 for c in centred) / 5
    expected = [(c - mean) / math.sqrt(var + 1e-8) for c in centred]
    got = adv[inputs.mask.bool()].tolist()
    assert got == pytest.approx(expected, rel=1e-6)
    assert adv[5] == 0
    with pytest.raises(ValueError, match="needs >= 2 unmasked tokens"):
        compute_advantages(_inputs([1.0], [0], [1]), AdvantageConfig(estimator="reinforce_pp_baseline"))


def test_padded_and_packed_layouts_agree():
    rewards, groups = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 0])
    padded_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    values, mask, cu = flatten_padded(torch.zeros(3, 3), padded_mask)
    padded = compute_advantages(AdvantageInputs(rewards, groups, mask, cu), AdvantageConfig())
    packed_inputs = AdvantageInputs(rewards, groups, torch.ones(6), torch.tensor([0, 2, 3, 6]))
    packed = compute_advantages(packed_inputs, AdvantageConfig())
    assert torch.equal(padded[mask.bool()], packed)


def test_no_gradient_through_advantages():
    inputs = _inputs([1, 0.0], [0, 0], [1, 1])
    inputs.rewards.requires_grad_()
    assert not compute_advantages(inputs, AdvantageConfig()).requires_grad


def test_registry_contract():
    assert {"grpo", "rloo", "reinforce_pp_baseline"} <= set(ADVANTAGES.names())
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        register_advantage("grpo")(lambda inputs, cfg: None)
    with pytest.raises(KeyError, match="known: .*grpo.*rloo"):
        get_advantage("ppo_gae")
    with pytest.raises(ValueError, match="advantage.estimator must be one of .* got 'gae'"):
        AdvantageConfig(estimator="gae")
    with pytest.raises(ValueError, match="advantage.eps must be >= 0, got -1"):
        AdvantageConfig(eps=-1)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"must both be \[S\]"):
        AdvantageInputs(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.ones(3), torch.tensor([0, 1, 2, 3]))


def test_group_index_from_ids():
    assert group_index_from_ids(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]
