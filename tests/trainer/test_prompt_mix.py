"""PromptMix: uniform draws, GLM-4.5V's difficulty-adaptive mix and a curriculum over pools, on
crafted prompt sets (pure Python, no process group)."""
from collections import Counter

import pytest

from megatron_vlm.rl.curriculum import AdaptiveMixConfig, CurriculumConfig
from megatron_vlm.rollout.protocol import RolloutRequest
from megatron_vlm.rl.config import PromptMixConfig
from megatron_vlm.trainer.prompt_mix import PromptMix

PROMPTS = [RolloutRequest(f"{kind}{i}", [1], metadata={"kind": kind})
           for kind in ("easy", "mid", "hard") for i in range(20)]


def kinds(requests):
    return Counter(r.metadata["kind"] for r in requests)


def test_uniform_is_seeded_and_distinct():
    a, b = PromptMix(PROMPTS, None, 10, seed=3), PromptMix(PROMPTS, None, 10, seed=3)
    first = a.draw()
    assert [r.request_id for r in first] == [r.request_id for r in b.draw()]
    assert len({r.request_id for r in first}) == 10 and a.observe([(first[0], 1.0)]) == {}


def test_adaptive_mix_moves_the_batch_to_the_tier_with_mixed_outcomes():
    cfg = PromptMixConfig(pool_key="kind", adaptive=AdaptiveMixConfig(tiers=["easy", "mid", "hard"],
                                                                        group_size=8, min_share=0.1))
    mix = PromptMix(PROMPTS, cfg, 20, seed=0)
    assert kinds(mix.draw()) == {"easy": 7, "mid": 7, "hard": 6}  # no measurement yet: p = 0.5 each
    easy, mid, hard = PROMPTS[0], PROMPTS[20], PROMPTS[40]
    # easy always solved, hard never, mid half the time: only mid gives informative groups
    metrics = mix.observe([(easy, 1.0)] * 8 + [(hard, 0.0)] * 8 + [(mid, 1.0)] * 4 + [(mid, 0.0)] * 4)
    assert metrics["pass_rate/easy"] == 1.0 and metrics["pass_rate/mid"] == 0.5
    assert metrics["next_share/easy"] == pytest.approx(0.1) and metrics["next_share/mid"] == pytest.approx(0.8)
    assert kinds(mix.draw()) == {"mid": 16, "easy": 2, "hard": 2}


def test_curriculum_advances_by_steps_and_draws_only_its_pools():
    cfg = PromptMixConfig(pool_key="kind", curriculum=CurriculumConfig(
        stages=[{"easy": 1.0}, {"mid": 1.0, "hard": 1.0}], rule="steps", steps_per_stage=2))
    mix = PromptMix(PROMPTS, cfg, 6, seed=0)
    assert kinds(mix.draw()) == {"easy": 6}
    assert mix.observe([(PROMPTS[0], 1.0)])["curriculum_stage"] == 0.0
    assert mix.observe([(PROMPTS[0], 1.0)])["curriculum_stage"] == 1.0
    assert kinds(mix.draw()) == {"mid": 3, "hard": 3}
    seen = [r.request_id for _ in range(6) for r in mix.draw() if r.metadata["kind"] == "mid"]
    assert len(seen) == 18 and len(set(seen[:18])) == 18  # without replacement within an epoch of 20


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="exactly one of adaptive or curriculum"):
        PromptMixConfig(pool_key="kind")
    cfg = PromptMixConfig(pool_key="level", adaptive=AdaptiveMixConfig(tiers=["easy"]))
    with pytest.raises(KeyError, match="pool_key 'level': prompt easy0 has no such metadata field"):
        PromptMix(PROMPTS, cfg, 4, seed=0)
    cfg = PromptMixConfig(pool_key="kind", adaptive=AdaptiveMixConfig(tiers=["easy", "expert"]))
    with pytest.raises(ValueError, match=r"names pools \['expert'\] that no prompt has"):
        PromptMix(PROMPTS, cfg, 4, seed=0)
