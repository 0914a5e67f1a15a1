"""Offline preference losses, registered by name: dpo (Ovis2.5's offline stage) and mpo (InternVL).

    inputs = PreferenceInputs.from_packed(logprobs, ref_logprobs, mask, cu_seqlens)
    loss, metrics = preference_loss_fn(inputs, PreferenceConfig(name="mpo"))

A batch holds P pairs. Packed, the sequences alternate chosen_0, rejected_0, chosen_1, ... (2P
sequences in the `megatron_vlm.rl.tokens` layout); `from_packed` sums each sequence's response
log-probs into the [P] tensors the losses take. Reference log-probs come from the frozen initial
policy, computed once offline or in the same step under no_grad; no gradient reaches them.

Normalisers: every term is a mean over pairs (the SFT term a mean over chosen tokens). Pass
`num_pairs` / `num_chosen_tokens` (global counts) and micro-batch losses add up to the full-batch
loss, as for the online losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kernels.policy_loss import SeqLayout
from megatron_vlm.rl.registry import Registry


@dataclass
class PreferenceInputs:
    chosen_logps: torch.Tensor        # [P] sum of the policy's log-probs over the chosen response
    rejected_logps: torch.Tensor      # [P]
    ref_chosen_logps: torch.Tensor    # [P] frozen reference policy
    ref_rejected_logps: torch.Tensor  # [P]
    chosen_tokens: torch.Tensor       # [P] response tokens of each chosen response (for the SFT term)
    num_pairs: float | torch.Tensor | None = None          # global pair count; default P
    num_chosen_tokens: float | torch.Tensor | None = None  # global chosen-token count; default sum(chosen_tokens)
    reward_shift: float | torch.Tensor = 0.0  # MPO's BCO shift delta (a running mean, see RewardShift)

    def __post_init__(self):
        P = self.chosen_logps.shape
        for name in ("rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_tokens"):
            if getattr(self, name).shape != P:
                raise ValueError(f"PreferenceInputs.{name} must be [P] = {list(P)}, "
                                 f"got {list(getattr(self, name).shape)}")

    @classmethod
    def from_packed(cls, logprobs, ref_logprobs, mask, cu_seqlens, cp_group=None, **kwargs) -> "PreferenceInputs":
        """Sequences alternate chosen, rejected: 2P sequences -> P pairs. Under context parallelism
        the tokens are this rank's share of each sequence and `cp_group` sums the sequence sums
        over the CP ranks (differentiably: every rank then holds the whole pairs' loss)."""
        if (len(cu_seqlens) - 1) % 2:
            raise ValueError(f"packed pairs need an even number of sequences, got {len(cu_seqlens) - 1}")
        layout = SeqLayout.build(mask, cu_seqlens, cp_group)
        maskf = mask.to(logprobs.dtype)
        seq = layout.segment_sum(logprobs * maskf)                              # [2P], differentiable
        ref = layout.segment_sum(ref_logprobs.detach().to(logprobs.dtype) * maskf)
        tokens = layout.tokens.to(logprobs.dtype)
        return cls(seq[0::2], seq[1::2], ref[0::2], ref[1::2], tokens[0::2], **kwargs)


@dataclass(kw_only=True)
class PreferenceConfig:
    name: str = "dpo"               # a registered preference loss: dpo | mpo
    beta: float = 0.1               # inverse temperature on the log-ratio to the reference
    label_smoothing: float = 0.0    # cDPO: assumed probability that a pair's label is flipped
    preference_weight: float = 0.8  # MPO: DPO term
    quality_weight: float = 0.2     # MPO: BCO quality term
    generation_weight: float = 1.0  # MPO: SFT term on the chosen response

    def __post_init__(self):
        if self.name not in PREFERENCE_LOSSES:
            raise ValueError(f"preference.name must be one of {PREFERENCE_LOSSES.names()}, got {self.name!r}")
        if not self.beta > 0:
            raise ValueError(f"preference.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"preference.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for field in ("preference_weight", "quality_weight", "generation_weight"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"preference.{field} must be >= 0, got {getattr(self, field)}")


PreferenceLossFn = Callable[[PreferenceInputs, PreferenceConfig], tuple[torch.Tensor, dict[str, torch.Tensor]]]
PREFERENCE_LOSSES: Registry[PreferenceLossFn] = Registry("preference loss")
register_preference_loss = PREFERENCE_LOSSES.register
get_preference_loss = PREFERENCE_LOSSES.get


def preference_loss_fn(inputs: PreferenceInputs, cfg: PreferenceConfig):
    return get_preference_loss(cfg.name)(inputs, cfg)


def _log_ratios(inputs: PreferenceInputs):
    chosen = inputs.chosen_logps - inputs.ref_chosen_logps.detach()
    rejected = inputs.rejected_logps - inputs.ref_rejected_logps.detach()
    return chosen, rejected


def _pairs(inputs: PreferenceInputs):
    return inputs.num_pairs if inputs.num_pairs is not None else max(len(inputs.chosen_logps), 1)


def _dpo_terms(inputs: PreferenceInputs, cfg: PreferenceConfig):
    chosen, rejected = _log_ratios(inputs)
    margin = cfg.beta * (chosen - rejected)  # [P]
    per_pair = -(1 - cfg.label_smoothing) * F.logsigmoid(margin) - cfg.label_smoothing * F.logsigmoid(-margin)
    metrics = {
        "reward_chosen": (cfg.beta * chosen).detach().mean(),
        "reward_rejected": (cfg.beta * rejected).detach().mean(),
        "reward_margin": margin.detach().mean(),
        "reward_accuracy": (margin.detach() > 0).float().mean(),
    }
    return per_pair.sum() / _pairs(inputs), metrics


@register_preference_loss("dpo")
def dpo_loss(inputs: PreferenceInputs, cfg: PreferenceConfig):
    """DPO, sigmoid form (Rafailov et al., arXiv 2305.18290); Ovis2.5's offline RL stage:

        h = beta * ((logp_c - ref_c) - (logp_r - ref_r))
        loss = mean over pairs of  -(1 - ls) log sigmoid(h) - ls log sigmoid(-h)

    ls = label_smoothing (cDPO; 0 is the paper). Sequence log-probs are sums over response tokens,
    as in the paper (no length normalisation).
    """
    loss, metrics = _dpo_terms(inputs, cfg)
    metrics["dpo_loss"] = loss.detach()
    return loss, metrics


@register_preference_loss("mpo")
def mpo_loss(inputs: PreferenceInputs, cfg: PreferenceConfig):
    """MPO, mixed preference optimisation (Wang et al., arXiv 2411.10442; InternVL2.5 / 3 / 3.5):

        loss = w_p * L_dpo + w_q * L_bco + w_g * L_sft
        L_bco = mean over pairs of  -log sigmoid(beta (logp_c - ref_c) - delta)
                                    - log sigmoid(-(beta (logp_r - ref_r) - delta))
        L_sft = -sum(logp over chosen tokens) / (number of chosen tokens)

    Defaults w_p 0.8, w_q 0.2, w_g 1.0 (the paper's and TRL's). delta, the BCO reward shift, is a
    running mean of the rewards beta * (logp - ref) over chosen and rejected responses; it is an
    input here (`inputs.reward_shift`) and the batch's reward mean and count come back in the
    metrics for the caller's `RewardShift.update`, so the loss stays a pure function.
    """
    dpo, metrics = _dpo_terms(inputs, cfg)
    chosen, rejected = _log_ratios(inputs)
    delta = inputs.reward_shift
    bco_per_pair = -F.logsigmoid(cfg.beta * chosen - delta) - F.logsigmoid(-(cfg.beta * rejected - delta))
    bco = bco_per_pair.sum() / _pairs(inputs)
    tokens = inputs.num_chosen_tokens
    if tokens is None:
        tokens = inputs.chosen_tokens.sum().clamp_min(1)
    sft = -inputs.chosen_logps.sum() / tokens
    loss = cfg.preference_weight * dpo + cfg.quality_weight * bco + cfg.generation_weight * sft
    rewards = cfg.beta * torch.cat([chosen, rejected]).detach()
    metrics.update(dpo_loss=dpo.detach(), bco_loss=bco.detach(), sft_loss=sft.detach(),
                   bco_reward_sum=rewards.sum(), bco_reward_count=torch.tensor(float(rewards.numel())))
    return loss, metrics


@dataclass(frozen=True)
class RewardShift:
    """MPO / BCO's delta: the mean of every reward beta * (logp - ref) seen so far (TRL keeps the
    same running mean). `update` returns a new value; feed `.mean` back as `reward_shift`."""
    mean: float = 0.0
    count: float = 0.0

    def update(self, reward_sum: float, reward_count: float) -> "RewardShift":
        count = self.count + reward_count
        if count == 0:
            return self
        return RewardShift((self.mean * self.count + reward_sum) / count, count)
