"""DAPO dynamic sampling: keep only prompt groups whose rewards differ, draw until the batch is full.

A group whose responses all got the same reward has zero advantage under GRPO / RLOO and adds
nothing but noise to the loss's normaliser; DAPO (arXiv 2503.14476) drops such groups and generates
for more prompts until `batch_groups` informative groups are collected.

    batch, stats = fill_dynamic_batch(draw, DynamicSamplingConfig(batch_groups=64, max_draws=8))

`draw()` is the caller's "sample a fresh prompt batch, generate, score" step and returns
`RolloutGroup`s; the function only decides what to keep and when to stop. When `max_draws` rounds
have not filled the batch it either returns what it has (`on_cap="partial"`, the default: a
smaller batch beats a stalled run) or raises (`on_cap="error"`, verl's behaviour). Extra groups of
the last round beyond `batch_groups` are discarded, as in verl. `informative_groups` is the same
test on tensors, for a trainer that already holds rewards [S] and group_index [S].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

ON_CAP = ("partial", "error")


@dataclass
class RolloutGroup:
    prompt_id: Hashable
    rewards: Sequence[float]   # one per response to this prompt
    payload: Any = None        # the rollouts themselves: opaque here


@dataclass(kw_only=True)
class DynamicSamplingConfig:
    # informative groups (prompts) per training batch; None: rollout.prompts_per_step, so one draw
    # fills the batch when every group is informative and the batch size follows the prompts
    batch_groups: int | None = None
    max_draws: int = 10        # generation rounds per batch at most (verl's max_num_gen_batches)
    on_cap: str = "partial"    # partial | error, when max_draws rounds did not fill the batch
    reward_atol: float = 0.0   # rewards closer than this count as equal

    def __post_init__(self):
        if self.batch_groups is not None and not self.batch_groups >= 1:
            raise ValueError(f"dynamic_sampling.batch_groups must be >= 1, got {self.batch_groups}")
        if not self.max_draws >= 1:
            raise ValueError(f"dynamic_sampling.max_draws must be >= 1, got {self.max_draws}")
        if self.on_cap not in ON_CAP:
            raise ValueError(f"dynamic_sampling.on_cap must be one of {ON_CAP}, got {self.on_cap!r}")
        if not self.reward_atol >= 0:
            raise ValueError(f"dynamic_sampling.reward_atol must be >= 0, got {self.reward_atol}")


def is_informative(rewards: Sequence[float], atol: float = 0.0) -> bool:
    """True when the group's rewards are not all equal (a group of one never is informative)."""
    return len(rewards) > 1 and max(rewards) - min(rewards) > atol


def informative_groups(rewards: torch.Tensor, group_index: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """[S] bool: response i belongs to a group whose rewards differ by more than atol."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    G = int(inverse.max()) + 1 if len(inverse) else 0
    r = rewards.double()
    hi = torch.full((G,), float("-inf"), dtype=r.dtype, device=r.device).scatter_reduce_(0, inverse, r, "amax")
    lo = torch.full((G,), float("inf"), dtype=r.dtype, device=r.device).scatter_reduce_(0, inverse, r, "amin")
    return (hi - lo > atol)[inverse]


def fill_dynamic_batch(draw: Callable[[], Sequence[RolloutGroup]],
                       cfg: DynamicSamplingConfig) -> tuple[list[RolloutGroup], dict[str, float]]:
    """Call draw() until cfg.batch_groups informative groups are collected or max_draws is hit.

    Returns (the first batch_groups informative groups in draw order, stats): draws, groups_seen,
    groups_dropped (all-equal), groups_kept, capped (1.0 when max_draws stopped it short),
    informative_frac (kept-before-truncation / seen: the signal that entropy is collapsing).
    """
    if cfg.batch_groups is None:
        raise ValueError("dynamic_sampling.batch_groups is unset: the caller fills it (the GRPO stage "
                         "uses rollout.prompts_per_step)")
    kept: list[RolloutGroup] = []
    seen = draws = 0
    while len(kept) < cfg.batch_groups and draws < cfg.max_draws:
        groups = draw()
        draws += 1
        seen += len(groups)
        kept += [g for g in groups if is_informative(g.rewards, cfg.reward_atol)]
    informative = len(kept)
    capped = informative < cfg.batch_groups
    if capped and cfg.on_cap == "error":
        raise RuntimeError(f"dynamic sampling collected {informative} of {cfg.batch_groups} informative groups in "
                           f"{draws} draws (max_draws={cfg.max_draws}); the prompts are too easy or too hard")
    stats = {"draws": float(draws), "groups_seen": float(seen), "groups_dropped": float(seen - informative),
             "groups_kept": float(min(informative, cfg.batch_groups)), "capped": float(capped),
             "informative_frac": informative / max(seen, 1)}
    return kept[: cfg.batch_groups], stats
