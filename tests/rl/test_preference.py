"""DPO and MPO against closed forms; gradient direction; packed layout; micro-batch sums."""
import math

import pytest
import torch

from megatron_vlm.rl.preference import (PREFERENCE_LOSSES, PreferenceConfig, PreferenceInputs, RewardShift,
                                        get_preference_loss, preference_loss_fn, register_preference_loss)
from tests.utils import assert_close


def _logsig(x):
    return -math.log1p(math.exp(-x))


def _inputs(**kwargs):
    chosen = torch.tensor([-10.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-12.0, -3.0], requires_grad=True)
    ref_c = torch.tensor([-11.0, -4.0], requires_grad=True)
    ref_r = torch.tensor([-11.0, -4.0], requires_grad=True)
    return PreferenceInputs(chosen, rejected, ref_c, ref_r, torch.tensor([5.0, 3.0]), **kwargs)


def test_dpo_closed_form_and_gradient_direction():
    inputs = _inputs()
    loss, m = preference_loss_fn(inputs, PreferenceConfig(name="dpo", beta=0.5))
    # pair 0: h = 0.5 * ((1) - (-1)) = 1; pair 1: h = 0.5 * (0 - 1) = -0.5
    assert loss.item() == pytest.approx(-(_logsig(1.0) + _logsig(-0.5)) / 2)
    assert m["reward_accuracy"].item() == 0.5 and m["reward_margin"].item() == pytest.approx(0.25)
    loss.backward()
    assert inputs.ref_chosen_logps.grad is None and inputs.ref_rejected_logps.grad is None
    assert torch.all(inputs.chosen_logps.grad < 0) and torch.all(inputs.rejected_logps.grad > 0)
    # d/d chosen = -beta * sigmoid(-h) / P
    expected = torch.tensor([-0.5 * torch.sigmoid(torch.tensor(-1.0)).item() / 2,
                             -0.5 * torch.sigmoid(torch.tensor(0.5)).item() / 2])
    assert_close(inputs.chosen_logps.grad, expected, atol=1e-7, rtol=1e-6, name="d chosen")


def test_dpo_label_smoothing():
    loss, _ = preference_loss_fn(_inputs(), PreferenceConfig(name="dpo", beta=0.5, label_smoothing=0.1))
    expected = sum(-0.9 * _logsig(h) - 0.1 * _logsig(-h) for h in (1.0, -0.5)) / 2
    assert loss.item() == pytest.approx(expected)


def test_mpo_closed_form():
    inputs = _inputs(reward_shift=0.2)
    cfg = PreferenceConfig(name="mpo", beta=0.5)
    loss, m = preference_loss_fn(inputs, cfg)
    dpo = -(_logsig(1.0) + _logsig(-0.5)) / 2
    # beta * log-ratios: chosen 0.5, 0; rejected -0.5, 0.5
    bco = (-_logsig(0.5 - 0.2) - _logsig(-(-0.5 - 0.2)) - _logsig(0 - 0.2) - _logsig(-(0.5 - 0.2))) / 2
    sft = (10 + 4) / 8
    assert m["dpo_loss"].item() == pytest.approx(dpo)
    assert m["bco_loss"].item() == pytest.approx(bco)
    assert m["sft_loss"].item() == pytest.approx(sft)
    assert loss.item() == pytest.approx(0.8 * dpo + 0.2 * bco + 1.0 * sft)
    assert m["bco_reward_sum"].item() == pytest.approx(0.5 + 0 - 0.5 + 0.5)
    loss.backward()
    assert inputs.ref_chosen_logps.grad is None
    assert torch.all(inputs.chosen_logps.grad < 0)  # every term raises the chosen response


def test_mpo_generation_only_is_sft():
    inputs = _inputs()
    loss, _ = preference_loss_fn(inputs, PreferenceConfig(name="mpo", preference_weight=0, quality_weight=0))
    loss.backward()
    assert loss.item() == pytest.approx(14 / 8)
    assert_close(inputs.chosen_logps.grad, torch.full((2,), -1 / 8), atol=1e-7, rtol=0, name="d chosen")
    assert torch.all(inputs.rejected_logps.grad == 0)


def test_reward_shift_is_a_running_mean():
    shift = RewardShift().update(1.0, 4).update(5.0, 1)
    assert shift.mean == pytest.approx(6 / 5) and shift.count == 5
    assert RewardShift().update(0.0, 0) == RewardShift()


def test_from_packed_sums_alternating_sequences():
    logp = torch.tensor([-1.0, -2.0, -3.0, -0.5, -0.5, -4.0, -1.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1.0])  # token 3 (a prompt token of pair 1's chosen) masked
    cu = torch.tensor([0, 2, 3, 5, 7])  # chosen0 (2), rejected0 (1), chosen1 (2), rejected1 (2)
    inputs = PreferenceInputs.from_packed(logp, ref, mask, cu)
    assert inputs.chosen_logps.tolist() == [-3.0, -0.5]
    assert inputs.rejected_logps.tolist() == [-3.0, -5.0]
    assert inputs.ref_chosen_logps.tolist() == [-2.0, -1.0]
    assert inputs.chosen_tokens.tolist() == [2.0, 1.0]
    preference_loss_fn(inputs, PreferenceConfig(name="mpo"))[0].backward()
    assert logp.grad[3] == 0 and logp.grad[0] < 0
    with pytest.raises(ValueError, match="even number of sequences"):
        PreferenceInputs.from_packed(logp, ref, mask, cu[:-1])


@pytest.mark.parametrize("name", ["dpo", "mpo"])
def test_micro_batches_add_up(name):
    cfg = PreferenceConfig(name=name)
    full, _ = preference_loss_fn(_inputs(reward_shift=0.1), cfg)
    full_in = _inputs()
    parts = 0.0
    for i in range(2):
        part = PreferenceInputs(full_in.chosen_logps[i:i + 1], full_in.rejected_logps[i:i + 1],
                                full_in.ref_chosen_logps[i:i + 1], full_in.ref_rejected_logps[i:i + 1],
                                full_in.chosen_tokens[i:i + 1], num_pairs=2, num_chosen_tokens=8.0, reward_shift=0.1)
        parts = parts + preference_loss_fn(part, cfg)[0]
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_registry_and_config():
    assert {"dpo", "mpo"} <= set(PREFERENCE_LOSSES.names())
    with pytest.raises(ValueError, match="'dpo' is already registered"):
        register_preference_loss("dpo")(lambda i, c: None)
    with pytest.raises(KeyError, match="known: dpo, mpo"):
        get_preference_loss("kto")
    with pytest.raises(ValueError, match="preference.beta must be > 0, got 0"):
        PreferenceConfig(beta=0)
    with pytest.raises(ValueError, match="preference.quality_weight must be >= 0, got -1"):
        PreferenceConfig(name="mpo", quality_weight=-1)
    with pytest.raises(ValueError, match=r"rejected_logps must be \[P\]"):
        PreferenceInputs(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), torch.zeros(2))
