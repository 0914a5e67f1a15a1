"""Which prompts the next batch draws: difficulty-adaptive mixes and curriculum stages.

Two policies over the same mechanism. Prompts live in named pools (difficulty tiers or strata);
a policy decides each pool's share of the next batch; `allocate` turns shares into integer counts
(largest remainder, deterministic); `PoolDrawer` draws that many prompts from each pool without
replacement within an epoch of the pool, reshuffling per epoch from (seed, pool, epoch), so a run
restarted with the same seed and cursor draws the same prompts. Both come from
`megatron_vlm.data.transforms`, where the dataset mixtures use them too.

- Difficulty-adaptive (GLM-4.1V-Thinking / GLM-4.5V's RLCS, arXiv 2507.01006): the next batch's
  mix follows the last batch's pass rate per tier. A tier's weight is the chance that a group of
  n responses gets mixed rewards, 1 - p^n - (1-p)^n for pass rate p (binary rewards): exactly the
  groups that survive dynamic sampling, so tiers the policy always or never solves fade out, with
  a floor `min_share` so every tier keeps being measured. A tier without a measurement yet counts
  as p = 0.5. Departure: the paper's exact schedule is not public; this is its stated rule
  ("sample by the model's current competence") in closed form.
- Curriculum: prompts stratified by a measured pass rate (e.g. pass@k of the initial policy),
  stages that each give a mix over strata (easy first), advanced by a rule: a fixed number of
  steps, or the batch pass rate reaching a threshold after a minimum number of steps.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Hashable, Mapping, Sequence

from megatron_vlm.data.transforms import PoolDrawer, allocate_counts

allocate = allocate_counts  # shares -> integer counts, shared with the data mixtures
__all__ = ["PoolDrawer", "allocate", "AdaptiveMixConfig", "adaptive_mix", "mixed_group_probability",
           "pass_rates_by_pool", "stratify", "CurriculumConfig", "CurriculumState", "curriculum_mix",
           "advance_curriculum"]

ADVANCE_RULES = ("steps", "pass_rate")


# ------------------------------------------------------------------------ difficulty-adaptive mix
@dataclass(kw_only=True)
class AdaptiveMixConfig:
    tiers: list[str]            # difficulty tiers, each a pool of prompts
    group_size: int = 8         # responses per prompt (n in 1 - p^n - (1-p)^n)
    min_share: float = 0.05     # floor per tier

    def __post_init__(self):
        if not self.tiers or len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"adaptive_mix.tiers must be non-empty and distinct, got {self.tiers}")
        if not self.group_size >= 1:
            raise ValueError(f"adaptive_mix.group_size must be >= 1, got {self.group_size}")
        if not 0 <= self.min_share * len(self.tiers) <= 1:
            raise ValueError(f"adaptive_mix.min_share must be in [0, 1/len(tiers)], got {self.min_share}")


def mixed_group_probability(pass_rate: float, group_size: int) -> float:
    """P(a group of `group_size` binary rewards is not all equal) at success probability pass_rate."""
    p = pass_rate
    return 1.0 - p ** group_size - (1.0 - p) ** group_size


def adaptive_mix(pass_rates: Mapping[str, float], cfg: AdaptiveMixConfig) -> dict[str, float]:
    """The next batch's share per tier from the last batch's pass rate per tier."""
    weights = {t: mixed_group_probability(pass_rates.get(t, 0.5), cfg.group_size) for t in cfg.tiers}
    total = sum(weights.values())
    free = 1.0 - cfg.min_share * len(cfg.tiers)
    if total <= 0:  # every tier solved always or never: fall back to uniform
        return {t: 1.0 / len(cfg.tiers) for t in cfg.tiers}
    return {t: cfg.min_share + free * w / total for t, w in weights.items()}


def pass_rates_by_pool(pools: Sequence[str], rewards: Sequence[float], threshold: float = 1.0) -> dict[str, float]:
    """Per pool, the share of responses with reward >= threshold (pools[i] is response i's pool)."""
    hits: dict[str, list[int]] = {}
    for pool, reward in zip(pools, rewards, strict=True):
        hits.setdefault(pool, []).append(int(reward >= threshold))
    return {pool: sum(h) / len(h) for pool, h in hits.items()}


# ----------------------------------------------------------------------------------- curriculum
def stratify(pass_rates: Mapping[Hashable, float], boundaries: Sequence[float],
             names: Sequence[str] | None = None) -> dict[str, list[Hashable]]:
    """Prompts into strata by measured pass rate, easiest first. boundaries are descending:
    (0.8, 0.2) gives p > 0.8 | 0.2 < p <= 0.8 | p <= 0.2. Prompts keep their input order."""
    if list(boundaries) != sorted(boundaries, reverse=True):
        raise ValueError(f"stratify boundaries must be descending, got {list(boundaries)}")
    names = list(names) if names is not None else [f"stratum{i}" for i in range(len(boundaries) + 1)]
    if len(names) != len(boundaries) + 1:
        raise ValueError(f"stratify needs {len(boundaries) + 1} names for {len(boundaries)} boundaries, got {names}")
    strata: dict[str, list[Hashable]] = {name: [] for name in names}
    for prompt, rate in pass_rates.items():
        index = sum(rate <= b for b in boundaries)
        strata[names[index]].append(prompt)
    return strata


@dataclass(kw_only=True)
class CurriculumConfig:
    stages: list[dict[str, float]]     # per stage, a share per stratum (need not sum to 1)
    rule: str = "pass_rate"            # steps | pass_rate
    steps_per_stage: int = 100         # rule "steps": steps before advancing
    advance_pass_rate: float = 0.7     # rule "pass_rate": advance when the batch pass rate reaches this ...
    min_steps: int = 10                # ... after at least this many steps in the stage

    def __post_init__(self):
        if not self.stages or any(not stage or not sum(stage.values()) > 0 for stage in self.stages):
            raise ValueError(f"curriculum.stages must be non-empty mixes with positive shares, got {self.stages}")
        if self.rule not in ADVANCE_RULES:
            raise ValueError(f"curriculum.rule must be one of {ADVANCE_RULES}, got {self.rule!r}")
        if not self.steps_per_stage >= 1:
            raise ValueError(f"curriculum.steps_per_stage must be >= 1, got {self.steps_per_stage}")
        if not 0 < self.advance_pass_rate <= 1:
            raise ValueError(f"curriculum.advance_pass_rate must be in (0, 1], got {self.advance_pass_rate}")
        if not self.min_steps >= 0:
            raise ValueError(f"curriculum.min_steps must be >= 0, got {self.min_steps}")


@dataclass(frozen=True)
class CurriculumState:
    stage: int = 0
    steps_in_stage: int = 0


def curriculum_mix(state: CurriculumState, cfg: CurriculumConfig) -> dict[str, float]:
    return dict(cfg.stages[state.stage])


def advance_curriculum(state: CurriculumState, cfg: CurriculumConfig, batch_pass_rate: float) -> CurriculumState:
    """The state after one training step whose batch had `batch_pass_rate`; the last stage stays."""
    steps = state.steps_in_stage + 1
    if cfg.rule == "steps":
        ready = steps >= cfg.steps_per_stage
    else:
        ready = steps >= cfg.min_steps and batch_pass_rate >= cfg.advance_pass_rate
    if ready and state.stage + 1 < len(cfg.stages):
        return CurriculumState(stage=state.stage + 1, steps_in_stage=0)
    return replace(state, steps_in_stage=steps)
