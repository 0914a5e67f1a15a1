"""Rollout correction: each registered weight against its closed form on hand-made tokens, the
metrics, the config's errors, and the weight reaching a loss's PG term only."""
import math

import pytest
import torch

from megatron_vlm.config import from_dict
from megatron_vlm.rl.config import UpdateConfig
from megatron_vlm.rl.losses import LossConfig, LossInputs, policy_loss_fn
from megatron_vlm.rl.rollout_correction import (ROLLOUT_CORRECTIONS, CorrectionInputs, RolloutCorrectionConfig,
                                                ratio_quantiles, rollout_correction_fn)
from tests.utils import assert_close

FP32 = dict(atol=1e-6, rtol=1e-6)
# Sequence 0: token ratios 3, 1.5, (masked: 100); sequence 1: 0.25, 1. Engine log-probs -1 throughout.
RHO = [3.0, 1.5, 100.0, 0.25, 1.0]
MASK = [1.0, 1.0, 0.0, 1.0, 1.0]
CU = [0, 3, 5]


def _inputs(rho=RHO, mask=MASK, cu=CU):
    engine = torch.full((len(rho),), -1.0)
    old = engine + torch.log(torch.tensor(rho))
    return CorrectionInputs(old.requires_grad_(), engine.requires_grad_(), torch.tensor(mask), torch.tensor(cu))


def _weight(name, **cfg):
    inputs = _inputs()
    weight, metrics = rollout_correction_fn(inputs, RolloutCorrectionConfig(name=name, **cfg))
    assert not weight.requires_grad and all(not v.requires_grad for v in metrics.values())
    assert weight[2] == 0  # off the loss tokens
    return weight, metrics


def test_token_tis_truncates_each_token_at_c():
    weight, m = _weight("token_tis", clip=2.0)
    assert_close(weight, torch.tensor([2.0, 1.5, 0.0, 0.25, 1.0]), **FP32, name="w")
    assert m["rollout_truncated_share"].item() == pytest.approx(1 / 4)
    assert m["rollout_masked_share"].item() == 0
    assert m["rollout_is_weight_mean"].item() == pytest.approx((2 + 1.5 + 0.25 + 1) / 4)


def test_seq_tis_is_the_clipped_product_per_sequence():
    weight, m = _weight("seq_tis", clip=2.0)
    # sequence 0: 3 * 1.5 = 4.5 -> 2 (the masked 100 is not in the product); sequence 1: 0.25 * 1 = 0.25
    assert_close(weight, torch.tensor([2.0, 2.0, 0.0, 0.25, 0.25]), **FP32, name="w")
    assert m["rollout_truncated_share"].item() == pytest.approx(2 / 4)  # share of tokens, both of sequence 0
    weight, _ = _weight("seq_tis", clip=5.0)
    assert_close(weight, torch.tensor([4.5, 4.5, 0.0, 0.25, 0.25]), **FP32, name="w, C = 5")


def test_seq_tis_geo_is_the_clipped_geometric_mean():
    weight, m = _weight("seq_tis_geo", clip=2.0)
    g0, g1 = math.sqrt(4.5), math.sqrt(0.25)  # 2.12 -> 2; 0.5
    assert g0 > 2
    assert_close(weight, torch.tensor([2.0, 2.0, 0.0, g1, g1]), **FP32, name="w")
    assert m["rollout_truncated_share"].item() == pytest.approx(2 / 4)


def test_icepop_masks_tokens_outside_the_band_and_keeps_the_ratio_inside():
    weight, m = _weight("icepop", low=0.5, high=2.0)
    assert_close(weight, torch.tensor([0.0, 1.5, 0.0, 0.0, 1.0]), **FP32, name="w")  # 3 and 0.25 leave
    assert m["rollout_masked_share"].item() == pytest.approx(2 / 4)
    assert m["rollout_truncated_share"].item() == 0


def test_seq_mask_masks_whole_sequences_by_their_product():
    weight, m = _weight("seq_mask", low=0.2, high=5.0)  # 4.5 and 0.25 are both inside
    assert_close(weight, torch.tensor([4.5, 4.5, 0.0, 0.25, 0.25]), **FP32, name="w")
    weight, m = _weight("seq_mask", low=0.5, high=5.0)  # sequence 1 (0.25) leaves whole
    assert_close(weight, torch.tensor([4.5, 4.5, 0.0, 0.0, 0.0]), **FP32, name="w")
    assert m["rollout_masked_share"].item() == pytest.approx(2 / 4)


def test_mismatch_metrics_closed_form():
    _, m = _weight("token_tis")
    logs = [math.log(r) for r in (3.0, 1.5, 0.25, 1.0)]
    assert m["rollout_mismatch_k1"].item() == pytest.approx(sum(logs) / 4)
    assert m["rollout_mismatch_k3"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in logs) / 4)
    q = ratio_quantiles(torch.log(torch.tensor(RHO)), torch.zeros(5), torch.tensor(MASK))
    assert q["rollout_ratio_p50"] == pytest.approx(1.25)  # median of 0.25, 1, 1.5, 3 (the masked 100 left out)
    assert set(q) == {"rollout_ratio_p5", "rollout_ratio_p50", "rollout_ratio_p95"}


def test_long_sequence_product_does_not_overflow():
    inputs = _inputs(rho=[math.exp(3.0)] * 40, mask=[1.0] * 40, cu=[0, 40])  # log product 120 -> clamped 20
    weight, _ = rollout_correction_fn(inputs, RolloutCorrectionConfig(name="seq_mask", low=0.5, high=2.0))
    assert torch.isfinite(weight).all() and (weight == 0).all()


@pytest.mark.parametrize("bad,field", [(dict(name="tis"), "rollout_correction.name"),
                                       (dict(clip=0.0), "rollout_correction.clip"),
                                       (dict(low=1.0), "rollout_correction.low"),
                                       (dict(high=1.0), "rollout_correction.high")])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        RolloutCorrectionConfig(**bad)


def test_registry_and_update_config():
    assert set(ROLLOUT_CORRECTIONS.names()) == {"token_tis", "seq_tis", "seq_tis_geo", "icepop", "seq_mask"}
    assert UpdateConfig().rollout_correction is None
    cfg = from_dict(UpdateConfig, {"rollout_correction": {"name": "icepop", "low": 0.5, "high": 5.0}})
    assert cfg.rollout_correction == RolloutCorrectionConfig(name="icepop", low=0.5, high=5.0)


@pytest.mark.parametrize("loss", ["dapo", "gspo", "cispo", "intern_s1"])
def test_the_weight_scales_the_pg_gradient_not_the_kl(loss):
    """token_tis with every ratio far above C: w = C on every token, so the PG gradient is C times
    the uncorrected one while the KL gradient is unchanged."""
    g = torch.Generator().manual_seed(0)
    T, C = 12, 0.1
    logp = -torch.rand(T, generator=g) * 2
    old = logp + 0.1 * torch.randn(T, generator=g)
    ref = logp + 0.3 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    mask, cu = torch.ones(T), torch.tensor([0, 5, 12])
    weight, _ = rollout_correction_fn(CorrectionInputs(old, old - 3.0, mask, cu),
                                      RolloutCorrectionConfig(name="token_tis", clip=C))
    assert_close(weight, torch.full((T,), C), **FP32, name="w")

    def grad(cfg, is_weight):
        lp = logp.clone().requires_grad_()
        out, _ = policy_loss_fn(LossInputs(lp, old, adv, mask, cu, ref_logprobs=ref, is_weight=is_weight), cfg)
        out.backward()
        return lp.grad

    pg = LossConfig(name=loss, aggregation="seq-mean-token-mean" if loss == "gspo" else None,
                    eps_low=0.2 if loss == "gspo" else None, eps_high=0.28 if loss == "gspo" else None)
    kl = LossConfig(name=loss, kl_type="k3", kl_coef=0.5, aggregation=pg.aggregation, eps_low=pg.eps_low,
                    eps_high=pg.eps_high)
    pg_plain, pg_weighted = grad(pg, None), grad(pg, weight)
    assert pg_plain.abs().max() > 1e-3
    assert_close(pg_weighted, C * pg_plain, **FP32, name="PG gradient x C")
    kl_only = grad(kl, None) - pg_plain
    assert_close(grad(kl, weight), C * pg_plain + kl_only, atol=1e-6, rtol=1e-5, name="KL gradient unscaled")
