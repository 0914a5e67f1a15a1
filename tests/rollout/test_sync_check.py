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


def test_one_flipped_token_passes_where_a_shifted_step_fails():
    """A healthy bf16 run with one large outlier passes (the max is not bounded); every token a
    little off does not."""
    bounds = SyncCheckConfig().resolved("bfloat16_engine")
    engine = [[-1.0] * 2000]
    outlier = [[-1.0] * 1999 + [-1.8]]
    assert check_logprobs(engine, outlier, bounds).max_abs == pytest.approx(0.8)
    shifted = [[-1.02] * 2000]
    with pytest.raises(WeightSyncError, match=r"mean_abs 0.02 > 0.006"):
        check_logprobs(engine, shifted, bounds)


def test_regimes_and_config_validation():
    assert precision("float32", torch.float32) == "float32"
    assert precision("bfloat16", torch.float32) == "bfloat16_engine"
    assert precision("auto", torch.float32) == "bfloat16_engine"  # vLLM: the checkpoint's dtype
    assert precision(torch.float32, torch.bfloat16) == "bfloat16"
    explicit = SyncCheckConfig(mean_abs=1.0).resolved("float32")
    assert explicit.mean_abs == 1.0 and explicit.kl == 1e-8  # given values win over the defaults
    with pytest.raises(ValueError, match="rollout.sync_check.kl must be > 0"):
        SyncCheckConfig(kl=0)
    with pytest.raises(WeightSyncError, match="not finite at 1 of 2 tokens"):
        check_logprobs([[-1.0, float("nan")]], [[-1.0, -2.0]], SyncCheckConfig())  # NaN > bound is False
    with pytest.raises(WeightSyncError, match="engine scored 1 tokens, trainer 2"):
        check_logprobs([[-1.0]], [[-1.0, -2.0]], SyncCheckConfig())
