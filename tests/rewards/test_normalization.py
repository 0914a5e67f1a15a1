"""Per-task normalisation against hand computation."""
import math
import statistics

import pytest

from megatron_vlm.rewards import RewardConfig, RewardSample, RewardScorer
from megatron_vlm.rewards.normalization import RunningStats, average_ranks, normalize_by_task

EPS = 1e-6


def test_running_stats_equal_the_statistics_of_all_values():
    first, second = [0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 5.0]
    stats = RunningStats().merged(first).merged(second)
    assert stats.count == 7
    assert stats.mean == pytest.approx(statistics.fmean(first + second))
    assert stats.std == pytest.approx(statistics.pstdev(first + second))


def test_mean_std_by_hand():
    # batch 1: task a = [0, 1, 1, 0] -> mean 0.5, std 0.5 -> [-1, 1, 1, -1]
    out, stats = normalize_by_task([0, 1, 1, 0], ["a"] * 4, "mean_std", {}, {}, EPS)
    one = 0.5 / (0.5 + EPS)
    assert out == pytest.approx([-one, one, one, -one])
    # batch 2: [1, 1] -> running over [0, 1, 1, 0, 1, 1]: mean 2/3, var 4/6 - 4/9 = 2/9
    out, stats = normalize_by_task([1, 1], ["a", "a"], "mean_std", {}, stats, EPS)
    expected = (1 - 2 / 3) / (math.sqrt(2 / 9) + EPS)
    assert out == pytest.approx([expected, expected])
    assert stats["a"].count == 6


def test_tasks_are_normalised_separately_then_weighted():
    # task a: sparse 0/1; task b: scores on a 0-100 scale
    rewards = [0.0, 80.0, 1.0, 60.0, 0.0, 100.0, 0.0]
    tasks = ["a", "b", "a", "b", "a", "b", "a"]
    out, stats = normalize_by_task(rewards, tasks, "mean_std", {"b": 2.0}, {}, EPS)
    a_mean, a_std = 0.25, math.sqrt(0.25 * 0.75)          # [0, 1, 0, 0]
    b_mean, b_std = 80.0, math.sqrt((0 + 400 + 400) / 3)   # [80, 60, 100]
    expected = [(0 - a_mean) / (a_std + EPS), 2 * (80 - b_mean) / (b_std + EPS), (1 - a_mean) / (a_std + EPS),
                2 * (60 - b_mean) / (b_std + EPS), (0 - a_mean) / (a_std + EPS), 2 * (100 - b_mean) / (b_std + EPS),
                (0 - a_mean) / (a_std + EPS)]
    assert out == pytest.approx(expected)
    assert set(stats) == {"a", "b"}


def test_constant_rewards_normalise_to_zero():
    out, _ = normalize_by_task([1.0, 1.0, 1.0], ["a"] * 3, "mean_std", {}, {}, EPS)
    assert out == [0.0, 0.0, 0.0]


def test_rank_by_hand():
    assert average_ranks([3, 1, 2, 2]) == [4, 1, 2.5, 2.5]
    out, stats = normalize_by_task([3, 1, 2, 2, 7], ["a", "a", "a", "a", "b"], "rank", {"a": 2.0}, {}, EPS)
    assert out == [2 * 1.0, 0.0, 2 * 0.5, 2 * 0.5, 0.5]  # a single sample ranks in the middle
    assert stats == {"a": RunningStats(), "b": RunningStats()}  # rank keeps no history


def test_none_only_weights():
    out, _ = normalize_by_task([1.0, 2.0], ["a", "b"], "none", {"a": 0.5}, {}, EPS)
    assert out == [0.5, 2.0]


def test_input_statistics_are_not_modified():
    before = {"a": RunningStats(2, 0.5, 0.5)}
    normalize_by_task([1.0], ["a"], "mean_std", {}, before, EPS)
    assert before == {"a": RunningStats(2, 0.5, 0.5)}


def test_unknown_mode_lists_known():
    with pytest.raises(KeyError, match="unknown normalization 'zscore'; known: mean_std, none, rank"):
        normalize_by_task([1.0], ["a"], "zscore", {}, {})


def test_scorer_normalises_per_task_and_checkpoints_its_statistics():
    cfg = RewardConfig(verifiers={"mcq": "choice", "num": "numeric"}, normalization="mean_std",
                       weights={"num": 2.0}, num_workers=1)
    batch = [RewardSample(sample_id=i, task=t, prompt="", response=r, reference=ref)
             for i, (t, r, ref) in enumerate([("mcq", "B", "B"), ("mcq", "C", "B"), ("num", "1", "1"),
                                             ("num", "2", "1"), ("num", "1", "1"), ("num", "3", "1")])]
    with RewardScorer(cfg) as scorer:
        result = scorer.score(batch)
        state = scorer.state_dict()
    assert result.raw == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    one = 0.5 / (0.5 + EPS)  # both tasks: mean 0.5, std 0.5
    assert result.rewards == pytest.approx([one, -one, 2 * one, -2 * one, 2 * one, -2 * one])
    assert result.metrics["reward/num/raw_mean"] == 0.5 and result.metrics["reward/mcq/nonzero_frac"] == 0.5
    assert state == {"mcq": {"count": 2, "mean": 0.5, "m2": 0.5}, "num": {"count": 4, "mean": 0.5, "m2": 1.0}}
