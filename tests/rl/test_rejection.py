"""Best-of-N rejection sampling on crafted scored rollouts."""
import pytest

from megatron_vlm.rewards.scorer import RewardSample
from megatron_vlm.rl.rejection import RejectionConfig, build_rejection_sft


def _sample(i, prompt, response, task="math", **metadata):
    return RewardSample(sample_id=i, task=task, prompt=prompt, response=response, reference="4", metadata=metadata)


SAMPLES = [
    _sample(0, "2+2?", "long derivation ... 4"), _sample(1, "2+2?", "4"), _sample(2, "2+2?", "5"),
    _sample(3, "2+2?", " 4 "),  # the same answer as sample 1 after strip
    _sample(4, "hard", "no"), _sample(5, "hard", "no idea"),
    _sample(6, "easy", "yes"), _sample(7, "easy", "yes!"),
]
REWARDS = [1.0, 1.0, 0.0, 1.0, 0.0, 0.2, 1.0, 1.0]


def test_best_of_n_keeps_the_best_shortest_and_drops_unsolved():
    examples, stats = build_rejection_sft(SAMPLES, REWARDS, RejectionConfig(keep_per_prompt=2))
    assert [(e.prompt, e.response) for e in examples] == [("2+2?", "4"), ("2+2?", "long derivation ... 4"),
                                                          ("easy", "yes"), ("easy", "yes!")]
    assert examples[0].pass_rate == pytest.approx(3 / 4) and examples[0].sample_id == 1
    assert stats == {"prompts": 3, "kept": 2, "unsolved": 1, "too_easy": 0}


def test_pass_rate_cap_drops_prompts_the_policy_already_solves():
    examples, stats = build_rejection_sft(SAMPLES, REWARDS, RejectionConfig(max_pass_rate=0.8))
    assert [e.prompt for e in examples] == ["2+2?"] and stats["too_easy"] == 1


def test_threshold_failures_and_prompt_ids():
    cfg = RejectionConfig(min_reward=0.1)
    examples, _ = build_rejection_sft(SAMPLES, REWARDS, cfg, failed_ids=[1, 3, 6])
    assert [(e.prompt, e.response) for e in examples] == [("2+2?", "long derivation ... 4"), ("hard", "no idea"),
                                                          ("easy", "yes!")]
    # the same prompt text under two prompt ids is two prompts
    same = [_sample(0, "q", "a", prompt_id="x"), _sample(1, "q", "b", prompt_id="y")]
    assert len(build_rejection_sft(same, [1, 1], RejectionConfig())[0]) == 2


def test_config_validation():
    with pytest.raises(ValueError, match="rejection.keep_per_prompt must be >= 1, got 0"):
        RejectionConfig(keep_per_prompt=0)
    with pytest.raises(ValueError, match="got 3 samples but 2 rewards"):
        build_rejection_sft(SAMPLES[:3], [1, 1], RejectionConfig())
