"""Advantage estimators for sequence-level (outcome) rewards, registered by name.

    adv = get_advantage("grpo")(AdvantageInputs(rewards, group_index, mask, cu_seqlens), cfg)

`rewards` [S] is one scalar per response (the scorer's output), `group_index` [S] says which
prompt each response answers (responses to one prompt form a group), mask / cu_seqlens are the
packed token layout of `megatron_vlm.rl.tokens`. Every estimator returns per-token advantages [T]
(float32, 0 on masked tokens), ready for `megatron_vlm.rl.losses`. No gradient flows through
advantages (they are computed under no_grad).

Semantics follow verl 0.9.1 (`core_algos`), checked against its source:
- GRPO: (r - mean_g) / (std_g + eps) with the unbiased (n-1) std and eps added to the std;
  without std normalisation (norm_by_std=False) it is Dr. GRPO's r - mean_g (arXiv 2503.20783;
  pair it with aggregation "seq-mean-token-sum-norm" and a constant normaliser in the loss).
- RLOO: r - mean of the other n-1 responses = n/(n-1) (r - mean_g).
- REINFORCE++-baseline (arXiv 2501.03262): r - mean_g, broadcast to tokens, then whitened over
  all unmasked tokens of the batch (token-weighted mean, unbiased variance, rsqrt(var + 1e-8)).
- A group of one response has mean 0 (and std 1 for GRPO), as in verl: its advantage is its reward.
Departure: a group whose rewards are all equal gets exactly 0 in GRPO and RLOO; verl gets 0 up to
float rounding of the mean, which its std normalisation (std ~ 1e-9, eps 1e-6) can blow up to
~1e-3. REINFORCE++-baseline whitening shifts such a group to -mean/std, as verl does.

The whitening statistics are those of the tokens passed in: compute advantages on the whole global
batch (they are cheap) before splitting it over data-parallel ranks and micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from megatron_vlm.rl.registry import Registry
from megatron_vlm.rl.tokens import seq_to_tokens

WHITEN_EPS = 1e-8  # verl's masked_whiten: rsqrt(var + 1e-8)


@dataclass
class AdvantageInputs:
    rewards: torch.Tensor      # [S] one scalar reward per response
    group_index: torch.Tensor  # [S] int64, equal for responses to the same prompt
    mask: torch.Tensor         # [T] 1 on response tokens that enter the loss
    cu_seqlens: torch.Tensor   # [S + 1]

    def __post_init__(self):
        S = len(self.cu_seqlens) - 1
        if self.rewards.shape != (S,) or self.group_index.shape != (S,):
            raise ValueError(f"rewards {tuple(self.rewards.shape)} and group_index {tuple(self.group_index.shape)} "
                             f"must both be [S] = [{S}] (from cu_seqlens)")
        if self.mask.shape != (int(self.cu_seqlens[-1]),):
            raise ValueError(f"mask {tuple(self.mask.shape)} must be [T] = [{int(self.cu_seqlens[-1])}]")


@dataclass(kw_only=True)
class AdvantageConfig:
    estimator: str = "grpo"     # a registered name: grpo, rloo, reinforce_pp_baseline
    norm_by_std: bool = True    # GRPO only; False = Dr. GRPO
    eps: float = 1e-6           # added to the group std (GRPO)

    def __post_init__(self):
        if self.estimator not in ADVANTAGES:
            raise ValueError(f"advantage.estimator must be one of {ADVANTAGES.names()}, got {self.estimator!r}")
        if not self.eps >= 0:
            raise ValueError(f"advantage.eps must be >= 0, got {self.eps}")


AdvantageFn = Callable[[AdvantageInputs, AdvantageConfig], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.get


def compute_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig) -> torch.Tensor:
    """The configured estimator's per-token advantages [T]."""
    return get_advantage(cfg.estimator)(inputs, cfg)


def group_index_from_ids(ids: Sequence[Hashable]) -> torch.Tensor:
    """Prompt uids (any hashable, e.g. strings) -> [S] int64 group index, numbered by first appearance."""
    numbers: dict[Hashable, int] = {}
    return torch.tensor([numbers.setdefault(i, len(numbers)) for i in ids], dtype=torch.int64)


@dataclass
class GroupStats:
    """Per-response statistics of its group, all [S]: size n, mean, unbiased std (0 for n = 1), and
    whether every reward in the group is equal."""
    size: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    all_equal: torch.Tensor

    @classmethod
    def of(cls, rewards: torch.Tensor, group_index: torch.Tensor) -> "GroupStats":
        r = rewards.double()  # float64 sums: group means of float32 rewards without rounding surprises
        _, inverse = torch.unique(group_index, return_inverse=True)
        G = int(inverse.max()) + 1 if len(inverse) else 0
        size = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inverse, torch.ones_like(r))
        mean = torch.zeros_like(size).index_add_(0, inverse, r) / size
        dev2 = (r - mean[inverse]).square()
        var = torch.zeros_like(size).index_add_(0, inverse, dev2) / (size - 1).clamp_min(1)
        hi = torch.full_like(size, float("-inf")).scatter_reduce_(0, inverse, r, "amax")
        lo = torch.full_like(size, float("inf")).scatter_reduce_(0, inverse, r, "amin")
        return cls(size[inverse], mean[inverse], var.sqrt()[inverse], (hi == lo)[inverse])


@register_advantage("grpo")
@torch.no_grad()
def grpo_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig) -> torch.Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300): A_i = (r_i - mean_g) / (std_g + eps), std unbiased.

    norm_by_std=False gives Dr. GRPO (arXiv 2503.20783): A_i = r_i - mean_g. A group of one has
    mean 0 and std 1 (verl). Departure: equal-reward groups are set to exactly 0 (see module doc).
    """
    stats = GroupStats.of(inputs.rewards, inputs.group_index)
    single = stats.size == 1
    mean = torch.where(single, 0.0, stats.mean)
    adv = inputs.rewards.double() - mean
    if cfg.norm_by_std:
        adv = adv / (torch.where(single, 1.0, stats.std) + cfg.eps)
    adv = torch.where(stats.all_equal & ~single, 0.0, adv)
    return _to_tokens(adv, inputs)


@register_advantage("rloo")
@torch.no_grad()
def rloo_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig) -> torch.Tensor:
    """RLOO (Ahmadian et al., arXiv 2402.14740): A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_g).

    A group of one keeps its reward (verl). Equal-reward groups give exactly 0.
    """
    stats = GroupStats.of(inputs.rewards, inputs.group_index)
    n = stats.size
    adv = torch.where(n > 1, n / (n - 1).clamp_min(1) * (inputs.rewards.double() - stats.mean),
                      inputs.rewards.double())
    adv = torch.where(stats.all_equal & (n > 1), 0.0, adv)
    return _to_tokens(adv, inputs)


@register_advantage("reinforce_pp_baseline")
@torch.no_grad()
def reinforce_pp_baseline_advantages(inputs: AdvantageInputs, cfg: AdvantageConfig) -> torch.Tensor:
    """REINFORCE++-baseline (Hu, arXiv 2501.03262): a_t = r_i - mean_g for every token of response i,
    then whitened over the batch's unmasked tokens: A_t = (a_t - mean_tok) / sqrt(var_tok + 1e-8),
    var unbiased over tokens (verl's masked_whiten). Longer responses weigh more in the statistics.
    A group of one uses baseline 0 (verl). Raises with fewer than two unmasked tokens.
    """
    stats = GroupStats.of(inputs.rewards, inputs.group_index)
    centred = inputs.rewards.double() - torch.where(stats.size == 1, 0.0, stats.mean)
    tokens = seq_to_tokens(centred, inputs.cu_seqlens)
    m = inputs.mask.to(tokens.dtype)
    count = m.sum()
    if count < 2:
        raise ValueError(f"reinforce_pp_baseline whitens over tokens and needs >= 2 unmasked tokens, got {int(count)}")
    mean = (tokens * m).sum() / count
    var = ((tokens - mean).square() * m).sum() / (count - 1)
    return ((tokens - mean) * torch.rsqrt(var + WHITEN_EPS) * m).float()


def _to_tokens(seq_adv: torch.Tensor, inputs: AdvantageInputs) -> torch.Tensor:
    return (seq_to_tokens(seq_adv, inputs.cu_seqlens) * inputs.mask.to(seq_adv.dtype)).float()
