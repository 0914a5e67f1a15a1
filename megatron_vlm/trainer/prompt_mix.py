"""Which prompts a GRPO step draws: uniformly, by GLM-4.5V's difficulty-adaptive mix, or by a
curriculum over pools (`rl.prompt_mix:` in a config).

    mix = PromptMix(prompts, cfg, prompts_per_step, seed)
    requests = mix.draw()                         # the same on every rank (deterministic)
    mix.observe([(request, raw_reward), ...])     # after the step: pass rates per pool

Pools are the values of one metadata field of the prompts (`pool_key`, e.g. a difficulty tier or
the demo's question kind). The policies themselves are `megatron_vlm.rl.curriculum`'s pure
functions; this class holds their state between steps and draws with its `PoolDrawer` (without
replacement within a pool's epoch, reshuffled per epoch from the seed).
"""
from __future__ import annotations

import random

from megatron_vlm.rl.config import PromptMixConfig
from megatron_vlm.rl.curriculum import (CurriculumState, PoolDrawer, adaptive_mix, advance_curriculum, allocate,
                                        curriculum_mix, pass_rates_by_pool)
from megatron_vlm.rollout.protocol import RolloutRequest


class PromptMix:
    def __init__(self, prompts: list[RolloutRequest], cfg: PromptMixConfig | None, per_step: int, seed: int):
        self.cfg, self.per_step, self.prompts = cfg, per_step, prompts
        self.rng = random.Random(seed)
        self.pass_rates: dict[str, float] = {}
        self.state = CurriculumState()
        if cfg is None:
            return
        pools: dict[str, list[int]] = {}
        for index, request in enumerate(prompts):
            if cfg.pool_key not in request.metadata:
                raise KeyError(f"rl.prompt_mix.pool_key {cfg.pool_key!r}: prompt {request.request_id} has no "
                               f"such metadata field (has {sorted(request.metadata)})")
            pools.setdefault(str(request.metadata[cfg.pool_key]), []).append(index)
        named = cfg.adaptive.tiers if cfg.adaptive else sorted({p for s in cfg.curriculum.stages for p in s})
        unknown = sorted(set(named) - set(pools))
        if unknown:
            raise ValueError(f"rl.prompt_mix names pools {unknown} that no prompt has; pools in the data: "
                             f"{sorted(pools)}")
        self.drawer = PoolDrawer(pools, seed=seed)

    def state_dict(self) -> dict:
        """What the next draws depend on (JSON-able): the uniform draw's RNG, the last pass rates,
        the curriculum's position, and how far each pool's epoch has been drawn."""
        return {"rng": random_state(self.rng), "pass_rates": dict(self.pass_rates),
                "curriculum": [self.state.stage, self.state.steps_in_stage],
                "cursor": dict(self.drawer.cursor) if self.cfg is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        set_random_state(self.rng, state["rng"])
        self.pass_rates = dict(state["pass_rates"])
        self.state = CurriculumState(*state["curriculum"])
        if self.cfg is not None:
            self.drawer.cursor = dict(state["cursor"])

    def shares(self) -> dict[str, float]:
        if self.cfg.adaptive is not None:
            return adaptive_mix(self.pass_rates, self.cfg.adaptive)
        return curriculum_mix(self.state, self.cfg.curriculum)

    def draw(self) -> list[RolloutRequest]:
        if self.cfg is None:
            return self.rng.sample(self.prompts, self.per_step)
        counts = allocate(self.shares(), self.per_step)
        return [self.prompts[index] for _, index in self.drawer.draw(counts)]

    def observe(self, scored: list[tuple[RolloutRequest, float]]) -> dict[str, float]:
        """Update from one step's responses (request, raw reward); returns metrics."""
        if self.cfg is None or not scored:
            return {}
        pools = [str(r.metadata[self.cfg.pool_key]) for r, _ in scored]
        rewards = [reward for _, reward in scored]
        self.pass_rates = pass_rates_by_pool(pools, rewards, self.cfg.pass_threshold)
        metrics = {f"pass_rate/{pool}": rate for pool, rate in self.pass_rates.items()}
        if self.cfg.curriculum is not None:
            passed = sum(r >= self.cfg.pass_threshold for r in rewards) / len(rewards)
            self.state = advance_curriculum(self.state, self.cfg.curriculum, passed)
            metrics["curriculum_stage"] = float(self.state.stage)
        metrics.update({f"next_share/{pool}": share for pool, share in self.shares().items()})
        return metrics


def random_state(rng: random.Random) -> list:
    """A `random.Random`'s state as JSON-able lists (`set_random_state` puts it back)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
