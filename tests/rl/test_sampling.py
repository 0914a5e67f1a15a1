"""Dynamic sampling, difficulty-adaptive mixes and curriculum stages on crafted batches."""
import pytest
import torch

from megatron_vlm.rl.curriculum import (AdaptiveMixConfig, CurriculumConfig, CurriculumState, PoolDrawer,
                                        adaptive_mix, advance_curriculum, allocate, curriculum_mix,
                                        mixed_group_probability, pass_rates_by_pool, stratify)
from megatron_vlm.rl.sampling import (DynamicSamplingConfig, RolloutGroup, fill_dynamic_batch, informative_groups,
                                      is_informative)


def _drawer(rounds):
    """draw() returning the crafted rounds in order, counting calls."""
    calls = []

    def draw():
        calls.append(1)
        return [RolloutGroup(pid, rewards) for pid, rewards in rounds[len(calls) - 1]]
    return draw, calls


ROUNDS = [
    [("a", [1, 1, 1]), ("b", [0, 1, 0]), ("c", [0, 0, 0])],
    [("d", [0.5, 0.5]), ("e", [1, 0]), ("f", [1])],
    [("g", [0, 1]), ("h", [1, 0]), ("i", [0.2, 0.3])],
]


def test_dynamic_sampling_drops_equal_groups_and_draws_until_full():
    draw, calls = _drawer(ROUNDS)
    batch, stats = fill_dynamic_batch(draw, DynamicSamplingConfig(batch_groups=3))
    assert [g.prompt_id for g in batch] == ["b", "e", "g"]  # "h" and "i" were drawn but exceed the batch
    assert len(calls) == 3
    assert stats == {"draws": 3.0, "groups_seen": 9.0, "groups_dropped": 4.0, "groups_kept": 3.0, "capped": 0.0,
                     "informative_frac": 5 / 9}


def test_dynamic_sampling_stops_at_the_cap():
    draw, calls = _drawer(ROUNDS)
    batch, stats = fill_dynamic_batch(draw, DynamicSamplingConfig(batch_groups=5, max_draws=2))
    assert [g.prompt_id for g in batch] == ["b", "e"] and stats["capped"] == 1.0 and len(calls) == 2
    draw, _ = _drawer(ROUNDS)
    with pytest.raises(RuntimeError, match="collected 2 of 5 informative groups in 2 draws"):
        fill_dynamic_batch(draw, DynamicSamplingConfig(batch_groups=5, max_draws=2, on_cap="error"))


def test_informative_tests_agree_on_lists_and_tensors():
    assert not is_informative([1]) and not is_informative([0.3, 0.3]) and is_informative([0, 1])
    assert not is_informative([0.3, 0.31], atol=0.05)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert informative_groups(rewards, groups).tolist() == [False, False, True, True, False, False, False]


def test_dynamic_sampling_config_validation():
    with pytest.raises(ValueError, match="dynamic_sampling.on_cap must be one of .* got 'skip'"):
        DynamicSamplingConfig(batch_groups=4, on_cap="skip")
    with pytest.raises(ValueError, match="dynamic_sampling.batch_groups must be >= 1, got 0"):
        DynamicSamplingConfig(batch_groups=0)
    # unset, the GRPO stage fills it from rollout.prompts_per_step; the bare function refuses to guess
    draw, calls = _drawer(ROUNDS)
    with pytest.raises(ValueError, match="batch_groups is unset"):
        fill_dynamic_batch(draw, DynamicSamplingConfig(max_draws=3))
    assert calls == []


def test_allocate_largest_remainder():
    assert allocate({"a": 1, "b": 2.5}, 7) == {"a": 2, "b": 5}  # 2.0 and 5.0 exactly
    assert allocate({"a": 1, "b": 1, "c": 1}, 4) == {"a": 2, "b": 1, "c": 1}  # the tie goes to the first
    assert sum(allocate({"x": 0.3, "y": 0.3, "z": 0.4}, 10).values()) == 10


def test_pool_drawer_covers_each_pool_per_epoch_and_is_deterministic():
    pools = {"easy": list("abcd"), "hard": list("xyz")}
    one = PoolDrawer(pools, seed=3)
    first = one.draw({"easy": 4, "hard": 2})
    assert sorted(p for t, p in first if t == "easy") == list("abcd")  # one epoch, no repeats
    second = one.draw({"hard": 2})
    hard = [p for t, p in first + second if t == "hard"]
    assert sorted(hard[:3]) == list("xyz")  # epoch 0 finished before epoch 1 starts
    again = PoolDrawer(pools, seed=3)
    assert again.draw({"easy": 4, "hard": 2}) + again.draw({"hard": 2}) == first + second
    assert PoolDrawer(pools, seed=4).draw({"easy": 4}) != first[:4]


def test_adaptive_mix_favours_tiers_with_mixed_groups():
    cfg = AdaptiveMixConfig(tiers=["easy", "medium", "hard"], group_size=4, min_share=0.05)
    # easy is always solved, medium half the time, hard never: medium gets all but the floors
    mix = adaptive_mix({"easy": 1.0, "medium": 0.5, "hard": 0.0}, cfg)
    assert mix == pytest.approx({"easy": 0.05, "medium": 0.9, "hard": 0.05})
    assert mixed_group_probability(0.5, 4) == pytest.approx(1 - 2 / 16)
    # closed form with two informative tiers: weights 1 - 0.9^4 - 0.1^4 and 1 - 2 / 16
    mix = adaptive_mix({"easy": 0.9, "medium": 0.5, "hard": 0.0}, cfg)
    w_easy, w_med = 1 - 0.9 ** 4 - 0.1 ** 4, 1 - 2 / 16
    assert mix["easy"] == pytest.approx(0.05 + 0.85 * w_easy / (w_easy + w_med))
    assert sum(mix.values()) == pytest.approx(1.0)
    # an unmeasured tier counts as p = 0.5; all tiers degenerate -> uniform
    assert adaptive_mix({}, cfg) == pytest.approx({t: 1 / 3 for t in cfg.tiers})
    assert adaptive_mix({"easy": 1, "medium": 1, "hard": 0}, cfg) == pytest.approx({t: 1 / 3 for t in cfg.tiers})


def test_adaptive_loop_from_last_batch_pass_rates():
    pools = {"easy": [f"e{i}" for i in range(10)], "hard": [f"h{i}" for i in range(10)]}
    cfg = AdaptiveMixConfig(tiers=["easy", "hard"], group_size=8, min_share=0.1)
    rates = pass_rates_by_pool(["easy", "easy", "hard", "hard", "hard", "hard"], [1, 1, 0, 1, 0, 0])
    assert rates == {"easy": 1.0, "hard": 0.25}
    counts = allocate(adaptive_mix(rates, cfg), 10)
    assert counts == {"easy": 1, "hard": 9}
    batch = PoolDrawer(pools, seed=0).draw(counts)
    assert [t for t, _ in batch].count("hard") == 9


def test_adaptive_config_validation():
    with pytest.raises(ValueError, match="adaptive_mix.min_share must be in \\[0, 1/len\\(tiers\\)\\], got 0.6"):
        AdaptiveMixConfig(tiers=["a", "b"], min_share=0.6)


def test_stratify_by_measured_pass_rate():
    rates = {"p1": 1.0, "p2": 0.5, "p3": 0.0, "p4": 0.8, "p5": 0.81, "p6": 0.2}
    strata = stratify(rates, (0.8, 0.2), names=["easy", "medium", "hard"])
    assert strata == {"easy": ["p1", "p5"], "medium": ["p2", "p4"], "hard": ["p3", "p6"]}
    with pytest.raises(ValueError, match="descending"):
        stratify(rates, (0.2, 0.8))


def test_curriculum_advances_by_steps():
    cfg = CurriculumConfig(stages=[{"easy": 1}, {"easy": 0.3, "medium": 0.7}], rule="steps", steps_per_stage=2)
    state = CurriculumState()
    state = advance_curriculum(state, cfg, batch_pass_rate=0.0)
    assert state == CurriculumState(0, 1)
    state = advance_curriculum(state, cfg, batch_pass_rate=0.0)
    assert state == CurriculumState(1, 0) and curriculum_mix(state, cfg) == {"easy": 0.3, "medium": 0.7}
    for _ in range(5):  # the last stage stays
        state = advance_curriculum(state, cfg, batch_pass_rate=1.0)
    assert state.stage == 1


def test_curriculum_advances_by_pass_rate_after_min_steps():
    cfg = CurriculumConfig(stages=[{"easy": 1}, {"hard": 1}], rule="pass_rate", advance_pass_rate=0.7, min_steps=2)
    state = advance_curriculum(CurriculumState(), cfg, batch_pass_rate=0.9)  # high, but too early
    assert state == CurriculumState(0, 1)
    state = advance_curriculum(state, cfg, batch_pass_rate=0.6)  # old enough, too low
    assert state == CurriculumState(0, 2)
    state = advance_curriculum(state, cfg, batch_pass_rate=0.7)
    assert state == CurriculumState(1, 0)


def test_curriculum_config_validation():
    with pytest.raises(ValueError, match="curriculum.rule must be one of .* got 'loss'"):
        CurriculumConfig(stages=[{"a": 1}], rule="loss")
    with pytest.raises(ValueError, match="curriculum.stages must be non-empty"):
        CurriculumConfig(stages=[{"a": 0}])
