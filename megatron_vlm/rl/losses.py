"""Online policy losses, registered by name: ppo, dapo, dual_clip, gspo, intern_s1, cispo.

    loss, metrics = policy_loss_fn(LossInputs(logprobs, old_logprobs, advantages, mask, cu_seqlens), cfg)

Inputs are packed tokens (see `megatron_vlm.rl.tokens`): [T] log-probs of the current policy
(requires grad), of the rollout / old policy, per-token advantages (`megatron_vlm.rl.advantages`),
the loss mask, and cu_seqlens [S + 1]. Every loss returns (scalar loss, dict of metric tensors);
nothing calls .item(). Gradients reach `logprobs` only: never the old or reference log-probs or
the advantages.

Design:
- The clipped-ratio losses (PPO, DAPO, dual-clip, GSPO) do not re-derive PPO: each one resolves
  its paper's defaults into a `kernels.policy_loss.PolicyLossConfig` and calls
  `kernels.policy_loss.policy_loss` (the Triton / fused path on GPU, the torch path on CPU; its
  specification is `kernels.reference.policy_loss_ref`). A trainer that wants the loss fused with
  the LM head calls `kernels.policy_loss.fused_linear_policy_loss` with `kernel_policy_config(cfg)`:
  the same numbers without materialising logits.
- Only the numbers that differ between algorithms live in `LossConfig`; a field left None takes the
  selected loss's published default (e.g. eps_high 0.28 for DAPO, 4e-4 for GSPO).
- Aggregation is an option for every loss ("token-mean" per token, "seq-mean-token-mean" per
  sample, "seq-mean-token-sum", "seq-mean-token-sum-norm" for Dr. GRPO). Pass `normalizer` (the
  global token count, the global number of non-empty sequences, or a constant) and micro-batch /
  data-parallel losses add up to the full-batch loss; without it each call uses its own count.
- KL(pi || pi_ref): "none" (GLM-4.5V and DAPO train without it), or Schulman's k1 / k2 / k3 added
  to the loss as kl_coef * agg(kl). k3 is clamped to [-10, 10] as in verl.
- Rollout correction (`megatron_vlm.rl.rollout_correction`): `LossInputs.is_weight` [T] is a
  constant, non-negative per-token factor on the policy-gradient term of every loss (never on the
  KL term), applied before the aggregation, whose normaliser it leaves alone (a masked token still
  counts, as in IcePop, slime and TRL). The kernel losses take it as an explicit input rather than
  folded into the advantages: see `kernels.policy_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.policy_loss import PolicyLossConfig, SeqLayout, aggregation_weights, policy_loss
from kernels.reference import AGGREGATIONS, KL_ESTIMATORS, kl_penalty_ref
from megatron_vlm.rl.registry import Registry

TOKEN_LOG_RATIO_BOUNDS = (-20.0, 20.0)  # as kernels.policy_loss: verl clamps the log-ratio before exp


@dataclass
class LossInputs:
    logprobs: torch.Tensor        # [T] current policy, requires grad
    old_logprobs: torch.Tensor    # [T] policy that sampled the rollouts (or recomputed by the trainer)
    advantages: torch.Tensor      # [T]
    mask: torch.Tensor            # [T] 1 on tokens that enter the loss
    cu_seqlens: torch.Tensor      # [S + 1]
    ref_logprobs: torch.Tensor | None = None  # [T] frozen reference policy, needed when kl_type != "none"
    normalizer: float | torch.Tensor | None = None  # replaces the aggregation's divisor (see module doc)
    entropy: torch.Tensor | None = None  # [T] optional, reported as a metric only
    is_weight: torch.Tensor | None = None  # [T] rollout-correction weight on the PG term (no grad); None = 1
    cp_group: object = None  # context parallelism: the tokens are this rank's share of each sequence

    def layout(self) -> SeqLayout:
        """Sequence of each token and whole-sequence counts (summed over `cp_group`)."""
        return SeqLayout.build(self.mask, self.cu_seqlens, self.cp_group)

    def __post_init__(self):
        T = int(self.cu_seqlens[-1])
        for name in ("logprobs", "old_logprobs", "advantages", "mask", "ref_logprobs", "entropy", "is_weight"):
            value = getattr(self, name)
            if value is not None and value.shape != (T,):
                raise ValueError(f"LossInputs.{name} must be [T] = [{T}] (from cu_seqlens), got {tuple(value.shape)}")


@dataclass(kw_only=True)
class LossConfig:
    name: str = "dapo"                  # a registered policy loss
    eps_low: float | None = None        # ratio >= 1 - eps_low; None = the loss's default
    eps_high: float | None = None       # ratio <= 1 + eps_high; None = the loss's default
    clip_ratio_c: float | None = None   # dual-clip bound (dual_clip, intern_s1; default 3.0; .inf = off)
    aggregation: str | None = None      # one of kernels.reference.AGGREGATIONS; None = the loss's default
    kl_type: str = "none"               # none | k1 | k2 | k3
    kl_coef: float = 0.0
    nll_coef: float = 1.0               # intern_s1: weight of the NLL term on positive samples
    impl: str = "auto"                  # kernels dispatch: auto | torch | triton

    def __post_init__(self):
        if self.name not in POLICY_LOSSES:
            raise ValueError(f"loss.name must be one of {POLICY_LOSSES.names()}, got {self.name!r}")
        if self.eps_low is not None and not 0 < self.eps_low < 1:
            raise ValueError(f"loss.eps_low must be in (0, 1), got {self.eps_low}")
        if self.eps_high is not None and not self.eps_high > 0:
            raise ValueError(f"loss.eps_high must be > 0, got {self.eps_high}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"loss.clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.kl_type not in KL_ESTIMATORS:
            raise ValueError(f"loss.kl_type must be one of {KL_ESTIMATORS}, got {self.kl_type!r}")
        if not self.kl_coef >= 0:
            raise ValueError(f"loss.kl_coef must be >= 0, got {self.kl_coef}")
        if not self.nll_coef >= 0:
            raise ValueError(f"loss.nll_coef must be >= 0, got {self.nll_coef}")

    def kernel_config(self, *, ratio_level="token", eps_low, eps_high, aggregation, clip_ratio_c=None):
        """A kernels PolicyLossConfig from the given defaults, overridden by the fields set here."""
        low = self.eps_low if self.eps_low is not None else eps_low
        return PolicyLossConfig(
            ratio_level=ratio_level, eps_low=low,
            eps_high=self.eps_high if self.eps_high is not None else (eps_high if eps_high is not None else low),
            clip_ratio_c=self.clip_ratio_c if self.clip_ratio_c is not None else clip_ratio_c,
            kl_type=self.kl_type, kl_coef=self.kl_coef,
            aggregation=self.aggregation or aggregation)


LossFn = Callable[[LossInputs, LossConfig], tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: Registry[LossFn] = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get
# name -> LossConfig -> PolicyLossConfig, for the losses that are the kernel's clipped objective
_KERNEL_CONFIGS: dict[str, Callable[[LossConfig], PolicyLossConfig]] = {}


def policy_loss_fn(inputs: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured loss: (loss, metrics)."""
    return get_policy_loss(cfg.name)(inputs, cfg)


def kernel_policy_config(cfg: LossConfig) -> PolicyLossConfig | None:
    """The kernel configuration of a clipped-ratio loss (for fused_linear_policy_loss); None for a
    loss the kernel does not compute (intern_s1)."""
    build = _KERNEL_CONFIGS.get(cfg.name)
    return build(cfg) if build else None


def _through_kernel(inputs: LossInputs, cfg: LossConfig):
    kcfg = kernel_policy_config(cfg)
    return policy_loss(inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.mask, inputs.cu_seqlens,
                       kcfg, ref_logprobs=inputs.ref_logprobs, normalizer=inputs.normalizer,
                       entropy=inputs.entropy, impl=cfg.impl, is_weight=inputs.is_weight, cp_group=inputs.cp_group)


def _kernel_loss(name: str, build: Callable[[LossConfig], PolicyLossConfig]):
    _KERNEL_CONFIGS[name] = build
    return register_policy_loss(name)


@_kernel_loss("ppo", lambda cfg: cfg.kernel_config(eps_low=0.2, eps_high=None, aggregation="token-mean"))
def ppo_loss(inputs: LossInputs, cfg: LossConfig):
    """PPO token clip (Schulman et al., arXiv 1707.06347), as a loss to minimise:

        r_t = exp(logp_t - old_t),  pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))

    Defaults: eps_low 0.2, eps_high = eps_low (symmetric), token-mean. Departures from the paper,
    all verl's: the log-ratio is clamped to [-20, 20] before exp; the value function and entropy
    bonus are absent (advantages come from group baselines).
    """
    return _through_kernel(inputs, cfg)


@_kernel_loss("dapo", lambda cfg: cfg.kernel_config(eps_low=0.2, eps_high=0.28, aggregation="token-mean"))
def dapo_loss(inputs: LossInputs, cfg: LossConfig):
    """DAPO (Yu et al., arXiv 2503.14476): PPO's objective with clip-higher (eps_low 0.2,
    eps_high 0.28: low-probability tokens may grow further before clipping, against entropy
    collapse) and token-level aggregation (every token weighs the same, so long responses are not
    down-weighted). No KL by default. Dynamic sampling and the over-long penalty are separate:
    `megatron_vlm.rl.sampling` and `megatron_vlm.rl.overlong`.
    """
    return _through_kernel(inputs, cfg)


@_kernel_loss("dual_clip", lambda cfg: cfg.kernel_config(eps_low=0.2, eps_high=None, aggregation="token-mean",
                                                          clip_ratio_c=3.0))
def dual_clip_loss(inputs: LossInputs, cfg: LossConfig):
    """Dual-clip PPO (Ye et al., arXiv 1912.09729): for A_t < 0 the PPO term is further bounded,

        pg_t = min(max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps)), -A_t c),   c = clip_ratio_c = 3

    so a token whose ratio has grown far beyond 1 under a negative advantage cannot dominate the
    update (its gradient is 0). Defaults: eps 0.2 symmetric, token-mean.
    """
    return _through_kernel(inputs, cfg)


@_kernel_loss("gspo", lambda cfg: cfg.kernel_config(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4,
                                                     aggregation="seq-mean-token-mean"))
def gspo_loss(inputs: LossInputs, cfg: LossConfig):
    """GSPO (Zheng et al., arXiv 2507.18071; InternVL3.5's online RL stage): one importance ratio
    per sequence, the geometric mean of its token ratios, clipped per sequence:

        s_i = exp(mean_{t in i} (logp_t - old_t)),  pg_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))

    Defaults as the paper: eps_low 3e-4, eps_high 4e-4, a per-sample mean ("seq-mean-token-mean").
    The gradient flows through the geometric mean as in the paper; the log-ratio is clamped above
    at 10 (verl). With per-token advantages that vary inside a sequence the kernel uses the token's
    advantage (GSPO-token); with sequence-level advantages the two coincide.
    """
    return _through_kernel(inputs, cfg)


@register_policy_loss("intern_s1")
def intern_s1_loss(inputs: LossInputs, cfg: LossConfig):
    """Intern-S1's policy loss (arXiv 2508.15763, online RL; in the line of OREAL, arXiv 2502.06781):
    no ratio clipping; samples with a positive advantage are imitated, negative ones pushed down.
    The formula below is the one issue #6 specifies; it was not checked line by line against the
    report's text.

        loss = agg_t( nll_coef * [A_t > 0] * (-logp_t)  +  [A_t < 0] * (-A_t r_t) ) + kl_coef * agg_t(kl_t)
        r_t = exp(clamp(logp_t - old_t, -20, 20))

    Tokens with A_t = 0 (e.g. equal-reward groups) contribute nothing. The NLL term is unweighted
    by the advantage's size (behaviour cloning on the correct samples); the negative term is the
    importance-weighted policy gradient, equal to REINFORCE on-policy (r = 1).

    Dual-clip bound on the negative term (Ye et al., arXiv 1912.09729), on by default: for A_t < 0
    the term -A_t r_t = |A_t| r_t grows without bound in r_t, so one stale token whose probability
    rose far above the old policy's (r_t >> 1) could dominate the step, pushed down with a
    gradient |A_t| r_t. Dual-clip PPO bounds exactly this case, max(min(r A, clip(r) A), c A) for
    A < 0; this loss has no eps-clip, so its negative term becomes

        -A_t min(r_t, c)   (c = clip_ratio_c, default 3, as dual_clip; c = inf: the unbounded form)

    at most c |A_t|, with zero gradient once r_t > c. On-policy (r = 1 < c) nothing changes.

    Rollout correction: `is_weight` multiplies both policy terms (the NLL term is this loss's
    learning signal from positive samples as much as the negative term is from negative ones), not
    the KL term.
    Departures: both terms share one aggregation (default token-mean) and normaliser; the report's
    entropy control (KL-Cov) is not part of this loss. eps_low / eps_high must be unset (this loss
    has no eps-clip).
    """
    if cfg.eps_low is not None or cfg.eps_high is not None:
        raise ValueError(f"intern_s1 has no eps-clip: loss.eps_low and eps_high must be None, got "
                         f"{cfg.eps_low}, {cfg.eps_high}")
    clip_c = cfg.clip_ratio_c if cfg.clip_ratio_c is not None else 3.0
    logp, maskf = inputs.logprobs.float(), inputs.mask.float()
    weights = aggregation_weights(inputs.mask, inputs.layout(),
                                  cfg.aggregation or "token-mean", inputs.normalizer)  # [T], no grad
    adv = inputs.advantages.detach().float()  # no gradient to advantages or the old policy
    positive, negative = (adv > 0).float(), (adv < 0).float()
    ratio = (logp - inputs.old_logprobs.detach().float()).clamp(*TOKEN_LOG_RATIO_BOUNDS).exp()
    if inputs.is_weight is not None:
        weights = weights * inputs.is_weight.detach().float()  # the policy terms only; kl below is not
    nll_loss = (weights * positive * -logp).sum()
    pg_loss = (weights * negative * -adv * ratio.clamp(max=clip_c)).sum()
    loss = cfg.nll_coef * nll_loss + pg_loss
    metrics = {"pg_loss": pg_loss.detach(), "nll_loss": nll_loss.detach()}
    if cfg.kl_type != "none":
        if inputs.ref_logprobs is None:
            raise ValueError(f"kl_type={cfg.kl_type!r} needs ref_logprobs")
        kl_weights = aggregation_weights(inputs.mask, inputs.layout(),
                                         cfg.aggregation or "token-mean", inputs.normalizer)
        kl_loss = (kl_weights * kl_penalty_ref(logp, inputs.ref_logprobs.detach().float(), cfg.kl_type)).sum()
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    metrics.update(
        positive_token_frac=_masked_mean(positive, maskf),
        negative_token_frac=_masked_mean(negative, maskf),
        clipfrac_dual=_masked_mean(negative * (ratio.detach() > clip_c).float(), maskf),
        ratio_mean=_masked_mean(ratio.detach(), maskf),
        approx_kl=_masked_mean(inputs.old_logprobs.detach().float() - logp.detach(), maskf))
    if inputs.entropy is not None:
        metrics["entropy"] = _masked_mean(inputs.entropy.detach().float(), maskf)
    return loss, metrics


@register_policy_loss("cispo")
def cispo_loss(inputs: LossInputs, cfg: LossConfig):
    """CISPO (MiniMax-M1, arXiv 2506.13585, eqs. 4-5): clip the importance-sampling weight, not the
    update, and keep every token's gradient:

        loss = agg_t( -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * logp_t ) + kl_coef * agg_t(kl_t)
        r_t = exp(clamp(logp_t - old_t, -20, 20)),   d loss_t / d logp_t = -clip(r_t) A_t (times w_t)

    PPO / DAPO zero the gradient of a token whose ratio left the trust region, which drops the rare
    "fork" tokens of long reasoning; here such a token still contributes, with a bounded weight.
    Defaults as the paper: no lower bound on the weight (eps_low None: r_t >= 0 is the only floor;
    the paper sets eps_low "to a large value"), token-mean (the paper's 1 / sum |o_i|).
    eps_high is not published in the paper; the default 0.28 is DAPO's clip-higher bound (verl's
    cispo takes its clip_ratio_high). Rollout correction: `is_weight` multiplies the PG term.
    Runs through torch (autograd on [T]), not the fused head kernel: the trainer takes its
    log-probs from `linear_logprobs`, as for intern_s1. pg_loss reports the surrogate's value
    (-sg(w) A logp), not an objective estimate.
    """
    if cfg.clip_ratio_c is not None:
        raise ValueError(f"cispo has no dual-clip: loss.clip_ratio_c must be None, got {cfg.clip_ratio_c}")
    eps_high = cfg.eps_high if cfg.eps_high is not None else 0.28
    low = 1 - cfg.eps_low if cfg.eps_low is not None else 0.0
    logp, maskf = inputs.logprobs.float(), inputs.mask.float()
    weights = aggregation_weights(inputs.mask, inputs.layout(),
                                  cfg.aggregation or "token-mean", inputs.normalizer)  # [T], no grad
    adv, old = inputs.advantages.detach().float(), inputs.old_logprobs.detach().float()
    ratio = (logp.detach() - old).clamp(*TOKEN_LOG_RATIO_BOUNDS).exp()
    is_weight = ratio.clamp(low, 1 + eps_high)  # sg(clip(r))
    pg_weights = weights if inputs.is_weight is None else weights * inputs.is_weight.detach().float()
    pg_loss = (pg_weights * -is_weight * adv * logp).sum()
    loss, metrics = pg_loss, {"pg_loss": pg_loss.detach()}
    if cfg.kl_type != "none":
        if inputs.ref_logprobs is None:
            raise ValueError(f"kl_type={cfg.kl_type!r} needs ref_logprobs")
        kl_loss = (weights * kl_penalty_ref(logp, inputs.ref_logprobs.detach().float(), cfg.kl_type)).sum()
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    metrics.update(
        clipfrac_low=_masked_mean((ratio < low).float(), maskf),
        clipfrac_high=_masked_mean((ratio > 1 + eps_high).float(), maskf),
        approx_kl=_masked_mean(old - logp.detach(), maskf),
        ratio_mean=_masked_mean(ratio, maskf))
    if inputs.entropy is not None:
        metrics["entropy"] = _masked_mean(inputs.entropy.detach().float(), maskf)
    return loss, metrics


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp_min(1)
