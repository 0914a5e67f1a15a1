"""The weight-sync check's statistics and bounds (rollout/weight_sync.py), in closed form."""
import math

import pytest
import torch

from megatron_vlm.rollout.weight_sync import (SyncCheckConfig, WeightSyncError, check_logprobs,
                                              precision)


def test_statistics_in_closed_form():
    engine = [[-1.0, -2.0], [-0.5, -0.5]]
    trainer = [[-1.1, -2.0], [-0.5, -0.3]]  # r = trainer - engine: -0.1, 0, 0, 0.2
    check = check_logprobs(engine, trainer, SyncCheckConfig())  # no bounds: statistics only
    r = torch.tensor([-0.1, 0.0, 0.0, 0.2], dtype=torch.float64)
    assert check.tokens == 4 and math.isclose(check.max_abs, 0.2, rel_tol=1e-9)
    assert math.isclose(check.mean_abs, 0.075, rel_tol=1e-9)
    assert math.isclose(check.kl, float((torch.exp(r) - 1 - r).mean()), rel_tol=1e-9)
    assert check.kl > 0 and check.quantile_abs <= check.max_abs


def test_bulk_kl_drops_the_tokens_above_the_quantile():
    """The bulk KL is the k3 mean over the tokens at or below the quantile of |diff|: 100 tokens,
    r = 0.01 on 98 and 1.0 on 2, quantile 0.97 -> the two outliers are dropped."""
    engine = [[-1.0] * 100]
    trainer = [[-0.99] * 98 + [0.0, 0.0]]
    check = check_logprobs(engine, trainer, SyncCheckConfig(quantile=0.97))
    small, big = math.expm1(0.01) - 0.01, math.expm1(1.0) - 1.0
    assert math.isclose(check.bulk_kl, small, rel_tol=1e-6)
    assert math.isclose(check.kl, (98 * small + 2 * big) / 100, rel_tol=1e-6)
    assert check.kl > 100 * check.bulk_kl  # the outliers own the full KL


@pytest.mark.parametrize("regime", ["bfloat16_engine", "bfloat16"])
def test_one_flipped_token_passes_where_a_shifted_step_fails(regime):
    """A healthy bf16 run (rounding-sized differences, one flipped route 0.8 nats off) passes: the
    max is not bounded and the bulk KL drops the outlier. Every token a little off does not, even
    where its mean is under the mean bound: the bulk KL sees the shift's square."""
    bounds = SyncCheckConfig().resolved(regime)
    engine = [[-1.0] * 2000]
    rounding = torch.Generator().manual_seed(0)
    healthy = (-1.0 + 2e-3 * torch.randn(2000, generator=rounding, dtype=torch.float64)).tolist()
    outlier = [healthy[:1999] + [-1.8]]
    check = check_logprobs(engine, outlier, bounds)
    assert check.max_abs == pytest.approx(0.8) and check.bulk_kl < bounds.bulk_kl / 2
    with pytest.raises(WeightSyncError, match=r"mean_abs 0.02 > 0.01, bulk_kl 0.000199 > 1.2e-05"):
        check_logprobs(engine, [[-1.02] * 2000], bounds)
    # a stale bucket: every token moved, by different amounts (sd 5.5e-3 on top of rounding)
    stale = torch.tensor(healthy) + 5.5e-3 * torch.randn(2000, generator=rounding, dtype=torch.float64)
    assert (stale + 1.0).abs().mean() < bounds.mean_abs
    with pytest.raises(WeightSyncError, match=r"disagree after the weight sync: bulk_kl [0-9.e-]+ > 1.2e-05 ") as error:
        check_logprobs(engine, [stale.tolist()], bounds)
    assert "rollout.sync_check" in str(error.value)


def test_a_flipped_route_in_fp32_passes_and_a_stale_bucket_does_not():
    """The step that stopped the main job at db391e6 (GRPO step 79, fp32 engine and trainer): 7,806
    tokens at fp32 rounding but one whose top-k route flipped (0.0214 off) and a few after it in its
    sequence; its k3 KL (3.2e-8) was over the old fp32 KL bound (1e-8). The full statistics now
    allow a few such tokens; the bulk ones still see a shift of every token far below bf16 rounding."""
    bounds = SyncCheckConfig().resolved("float32")
    rounding = torch.Generator().manual_seed(1)
    r = 4e-7 * torch.randn(7806, generator=rounding, dtype=torch.float64)
    r[5000], r[5001:5005] = 0.0214, 0.0037  # the flipped token and its sequence's next ones
    engine = [[-2.0] * 7806]
    check = check_logprobs(engine, [(-2.0 + r).tolist()], bounds)
    assert check.max_abs == pytest.approx(0.0214) and 3e-8 < check.kl < 4e-8 and check.bulk_kl < 1e-12
    stale = r + 3e-4 * torch.randn(7806, generator=rounding, dtype=torch.float64)  # 1/10 of bf16 rounding
    with pytest.raises(WeightSyncError, match=r"bulk_kl [0-9.e-]+ > 1e-09"):
        check_logprobs(engine, [(-2.0 + stale).tolist()], bounds)


def test_regimes_and_config_validation():
    assert precision("float32", torch.float32) == "float32"
    assert precision("bfloat16", torch.float32) == "bfloat16_engine"
    assert precision("auto", torch.float32) == "bfloat16_engine"  # vLLM: the checkpoint's dtype
    assert precision(torch.float32, torch.bfloat16) == "bfloat16"
    explicit = SyncCheckConfig(mean_abs=1.0).resolved("float32")
    assert explicit.mean_abs == 1.0 and explicit.kl == 1e-5  # given values win over the defaults
    with pytest.raises(ValueError, match="rollout.sync_check.kl must be > 0"):
        SyncCheckConfig(kl=0)
    with pytest.raises(WeightSyncError, match="not finite at 1 of 2 tokens"):
        check_logprobs([[-1.0, float("nan")]], [[-1.0, -2.0]], SyncCheckConfig())  # NaN > bound is False
    with pytest.raises(WeightSyncError, match="engine scored 1 tokens, trainer 2"):
        check_logprobs([[-1.0]], [[-1.0, -2.0]], SyncCheckConfig())
