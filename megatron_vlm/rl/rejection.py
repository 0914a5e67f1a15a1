"""Best-of-N rejection sampling: rollouts scored by verifiers -> SFT data (Intern-S1's "offline RL").

    examples, stats = build_rejection_sft(samples, raw_rewards, RejectionConfig(keep_per_prompt=1))

Per prompt, the N scored responses are ranked by reward (ties: the shorter response first, then
the original order, so the result is deterministic); the best `keep_per_prompt` with a reward of at
least `min_reward` become SFT examples. Prompts no response solves are dropped (nothing to imitate),
and so are prompts the policy already solves more often than `max_pass_rate` (imitating them
teaches little and over-weights easy data). Identical responses count once. Use the scorer's raw
(unnormalised) rewards: thresholds are on the verifier's scale.

Inputs are the scorer's own `RewardSample`s; a prompt is identified by metadata["prompt_id"] when
present, else by (task, prompt text). Samples whose reward failed (timeouts, errors) are excluded
by passing their ids in `failed_ids`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence


@dataclass(kw_only=True)
class RejectionConfig:
    min_reward: float = 1.0      # a response qualifies at reward >= min_reward
    keep_per_prompt: int = 1     # best-of-N keeps the k best qualifying responses
    max_pass_rate: float = 1.0   # drop prompts whose pass rate (share of responses qualifying) exceeds this
    dedupe: bool = True          # identical responses (after strip) count once
    prefer_shorter: bool = True  # ties in reward go to the shorter response

    def __post_init__(self):
        if not self.keep_per_prompt >= 1:
            raise ValueError(f"rejection.keep_per_prompt must be >= 1, got {self.keep_per_prompt}")
        if not 0 <= self.max_pass_rate <= 1:
            raise ValueError(f"rejection.max_pass_rate must be in [0, 1], got {self.max_pass_rate}")


@dataclass
class SFTExample:
    prompt: str
    response: str
    task: str
    reward: float
    pass_rate: float          # of this prompt's responses, before deduplication
    sample_id: Any = None
    reference: Any = None
    metadata: dict = field(default_factory=dict)


def prompt_key(sample) -> Hashable:
    return sample.metadata.get("prompt_id", (sample.task, sample.prompt))


def build_rejection_sft(samples: Sequence, rewards: Sequence[float], cfg: RejectionConfig,
                        failed_ids: Sequence[Any] = ()) -> tuple[list[SFTExample], dict[str, int]]:
    """(SFT examples in prompt order of first appearance, counts: prompts, kept, unsolved, too_easy)."""
    if len(samples) != len(rewards):
        raise ValueError(f"got {len(samples)} samples but {len(rewards)} rewards")
    failed = set(failed_ids)
    groups: dict[Hashable, list[tuple[int, Any, float]]] = {}
    for order, (sample, reward) in enumerate(zip(samples, rewards)):
        if sample.sample_id not in failed:
            groups.setdefault(prompt_key(sample), []).append((order, sample, float(reward)))
    examples: list[SFTExample] = []
    stats = {"prompts": len(groups), "kept": 0, "unsolved": 0, "too_easy": 0}
    for group in groups.values():
        passing = [g for g in group if g[2] >= cfg.min_reward]
        pass_rate = len(passing) / len(group)
        if not passing:
            stats["unsolved"] += 1
            continue
        if pass_rate > cfg.max_pass_rate:
            stats["too_easy"] += 1
            continue
        ranked = sorted(passing, key=lambda g: (-g[2], len(g[1].response) if cfg.prefer_shorter else 0, g[0]))
        seen: set[str] = set()
        chosen = []
        for _, sample, reward in ranked:
            text = sample.response.strip()
            if cfg.dedupe and text in seen:
                continue
            seen.add(text)
            chosen.append(SFTExample(sample.prompt, sample.response, sample.task, reward, pass_rate,
                                     sample.sample_id, sample.reference, dict(sample.metadata)))
            if len(chosen) == cfg.keep_per_prompt:
                break
        examples += chosen
        stats["kept"] += 1
    return examples, stats
