"""Reward-model hacking monitor: agreement, divergence, and the sample ids it points at."""
import random

import pytest

from megatron_vlm.rewards.hacking import HackingMonitor, HackingMonitorConfig, spearman

CFG = HackingMonitorConfig(window=64, min_samples=16, min_correlation=0.2, max_false_positive_rate=0.3)


def test_spearman_by_hand():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # nan: constant input


def test_rm_agreeing_with_the_verifier_is_not_flagged():
    rng = random.Random(0)
    verifier = [float(i % 2) for i in range(32)]
    rm = [v * 2 + rng.gauss(0, 0.3) for v in verifier]
    report = HackingMonitor(CFG).update(list(range(32)), rm, verifier)
    assert not report.flagged
    assert report.metrics["hacking/spearman"] > 0.8


def test_rm_rewarding_wrong_answers_is_flagged_with_their_ids():
    verifier = [float(i % 2) for i in range(32)]
    rm = [1.0 - v + 0.01 * i for i, v in enumerate(verifier)]  # high RM score exactly when wrong
    report = HackingMonitor(CFG).update([f"s{i}" for i in range(32)], rm, verifier)
    assert report.flagged
    assert report.metrics["hacking/spearman"] < 0
    assert report.metrics["hacking/false_positive_rate"] == 1.0
    assert report.suspicious_ids == [f"s{i}" for i in range(0, 32, 2)]


def test_no_flag_before_min_samples_and_window_is_bounded():
    monitor = HackingMonitor(CFG)
    report = monitor.update([0, 1, 2, 3], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert not report.flagged  # clearly divergent, but only 4 pairs
    for step in range(20):
        report = monitor.update(list(range(8)), [1.0, 0.0] * 4, [0.0, 1.0] * 4)
    assert report.flagged and report.metrics["hacking/window"] == 64


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=1), "hacking.window must be >= 2, got 1"),
    (dict(window=8, min_samples=9), "hacking.min_samples must be in \\[2, window=8\\], got 9"),
    (dict(min_correlation=2.0), "hacking.min_correlation must be in \\[-1, 1\\], got 2.0"),
    (dict(max_false_positive_rate=-0.1), "hacking.max_false_positive_rate must be in \\[0, 1\\], got -0.1"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HackingMonitorConfig(**kwargs)
