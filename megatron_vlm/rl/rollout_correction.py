"""Rollout correction: importance weights between the rollout engine and the trainer, registered by name.

    weight, metrics = rollout_correction_fn(CorrectionInputs(old_logprobs, engine_logprobs, mask, cu_seqlens), cfg)

Decoupled PPO (Hilton et al., arXiv 2110.00641; verl's "rollout correction", slime's --use-tis):
the engine samples with its own numerics (pi_engine: vLLM kernels, bf16 / fp8), the trainer
recomputes the proximal policy's log-probs (pi_old, `rollout.old_logprobs: trainer`), and the PPO
ratio is taken against pi_old. What is left is the behaviour mismatch pi_old / pi_engine on tokens
the engine drew; each variant turns it into a per-token weight w_t >= 0 on the policy-gradient term
of the loss (`LossInputs.is_weight`):

    rho_t = exp(clamp(logp_old_t - logp_engine_t, -20, 20))           token ratio
    token_tis    w_t = min(rho_t, C)                                   truncated IS, per token
    seq_tis      w_t = min(exp(clamp(sum_{s in i} log rho_s, +-20)), C)  per sequence i, the product
    seq_tis_geo  w_t = min(exp(mean_{s in i} log rho_s), C)            per sequence, the geometric mean
    icepop       w_t = rho_t [low <= rho_t <= high]                    masked IS, per token
    seq_mask     w_t = R_i [low <= R_i <= high],  R_i = exp(clamp(sum log rho, +-20))   per sequence

(sums and means over the sequence's loss tokens). Weights are constants: no gradient reaches either
log-prob.

Design, and where the peers differ:
- The weight multiplies the policy-gradient term only, never the KL or entropy terms: slime
  (`pg_loss * tis_weights`), verl (`pg_losses * rollout_is_weights`), TRL (the IS ratio on the
  per-token PG loss, before the beta * KL term) and NeMo-RL do the same. The KL regularises towards
  the reference whatever distribution sampled the token.
- A masked token (icepop, seq_mask) leaves the policy gradient but still counts in the loss
  normaliser, and its KL term stays: IcePop's objective (Ring-1T, arXiv 2510.18855) keeps
  1 / sum |y_i| over all tokens, and slime's icepop (weight 0, loss mask unchanged) and TRL's
  token_mask / sequence_mask do the same. verl's rejection sampling (`rollout_rs`) instead removes
  the token from the response mask, so it also leaves the normaliser and the KL; we do not follow it:
  a step that masks many tokens would otherwise scale up the gradient of the rest.
- Masked IS keeps rho as the weight inside the band (IcePop's M(k) = k; TRL; verl's mask mode),
  not 1. Truncated IS has no lower bound (slime's tis_clip_low defaults to 0, verl truncates above).
- The sequence-level product overflows for long responses; its log is clamped to [-20, 20] before
  exp, as verl's SAFETY_BOUND. seq_tis_geo (verl's "geometric") is the length-normalised version.
- Every loss takes the weight as an explicit [T] tensor, not folded into the advantages (see
  `kernels.policy_loss`): GSPO's sequence ratio, intern_s1's NLL term and the clip metrics would
  otherwise see it.

Metrics (tensors, masked token means of the micro-batch): mismatch_k1 = mean(logp_old - logp_engine)
(the k1 estimate of -KL(pi_engine || pi_old)), mismatch_k3 = mean(rho - 1 - log rho) (k3 of
KL(pi_engine || pi_old), >= 0), the share of tokens whose weight was truncated at C, the share
masked to 0, and the mean weight. `ratio_quantiles` gives p5 / p50 / p95 of rho on the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.policy_loss import SeqLayout
from megatron_vlm.rl.registry import Registry

LOG_RATIO_BOUNDS = (-20.0, 20.0)  # token and sequence log-ratios, before exp (verl's SAFETY_BOUND)


@dataclass
class CorrectionInputs:
    old_logprobs: torch.Tensor     # [T] proximal policy, recomputed by the trainer
    engine_logprobs: torch.Tensor  # [T] behaviour policy: what the engine reported for its sample
    mask: torch.Tensor             # [T] 1 on tokens that enter the loss
    cu_seqlens: torch.Tensor       # [S + 1]
    cp_group: object = None        # context parallelism: sequence sums over the CP group

    def layout(self) -> SeqLayout:
        return SeqLayout.build(self.mask, self.cu_seqlens, self.cp_group)

    def __post_init__(self):
        T = int(self.cu_seqlens[-1])
        for name in ("old_logprobs", "engine_logprobs", "mask"):
            if getattr(self, name).shape != (T,):
                raise ValueError(f"CorrectionInputs.{name} must be [T] = [{T}], got {tuple(getattr(self, name).shape)}")

    def log_ratio(self) -> torch.Tensor:
        """log rho_t = logp_old - logp_engine on loss tokens, 0 elsewhere, clamped. [T] fp32."""
        diff = self.old_logprobs.detach().float() - self.engine_logprobs.detach().float()
        return (diff * self.mask.float()).clamp(*LOG_RATIO_BOUNDS)


@dataclass(kw_only=True)
class RolloutCorrectionConfig:
    name: str = "token_tis"   # a registered correction
    clip: float = 2.0         # C: the truncation of token_tis / seq_tis / seq_tis_geo (slime tis_clip 2)
    low: float = 0.5          # icepop / seq_mask: keep ratios >= low (IcePop 0.5)
    high: float = 2.0         # icepop / seq_mask: keep ratios <= high (IcePop's paper: 5)

    def __post_init__(self):
        if self.name not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"rollout_correction.name must be one of {ROLLOUT_CORRECTIONS.names()}, got {self.name!r}")
        if not self.clip > 0:
            raise ValueError(f"rollout_correction.clip must be > 0, got {self.clip}")
        if not 0 <= self.low < 1:
            raise ValueError(f"rollout_correction.low must be in [0, 1), got {self.low}")
        if not self.high > 1:
            raise ValueError(f"rollout_correction.high must be > 1, got {self.high}")


CorrectionFn = Callable[[CorrectionInputs, RolloutCorrectionConfig], tuple[torch.Tensor, dict[str, torch.Tensor]]]
ROLLOUT_CORRECTIONS: Registry[CorrectionFn] = Registry("rollout correction")
register_rollout_correction = ROLLOUT_CORRECTIONS.register
get_rollout_correction = ROLLOUT_CORRECTIONS.get


def rollout_correction_fn(inputs: CorrectionInputs, cfg: RolloutCorrectionConfig):
    """The configured correction: (weight [T] fp32, no grad, 0 off the loss tokens; metrics)."""
    return get_rollout_correction(cfg.name)(inputs, cfg)


@register_rollout_correction("token_tis")
def token_tis(inputs: CorrectionInputs, cfg: RolloutCorrectionConfig):
    """Token-level truncated IS: w_t = min(rho_t, C). slime --use-tis (tis_clip, tis_clip_low 0),
    verl rollout_is="token" (truncate), NeMo-RL truncated_importance_sampling_ratio, TRL
    vllm_importance_sampling_mode="token_truncate"; "Your efficient RL framework secretly brings you
    off-policy RL training" (Yao et al., 2025)."""
    rho = inputs.log_ratio().exp()
    return _truncated(rho, rho, inputs, cfg)


@register_rollout_correction("seq_tis")
def seq_tis(inputs: CorrectionInputs, cfg: RolloutCorrectionConfig):
    """Sequence-level truncated IS: one weight per sequence, w_i = min(prod_t rho_t, C) (the product
    in log space, clamped to [-20, 20]); verl rollout_is="sequence", TRL "sequence_truncate"."""
    layout = inputs.layout()
    seq = layout.segment_sum(inputs.log_ratio()).clamp(*LOG_RATIO_BOUNDS).exp()  # [S]
    return _truncated(seq[layout.seq_index], inputs.log_ratio().exp(), inputs, cfg)


@register_rollout_correction("seq_tis_geo")
def seq_tis_geo(inputs: CorrectionInputs, cfg: RolloutCorrectionConfig):
    """Sequence-level truncated IS with the geometric mean over the response tokens,
    w_i = min(exp(mean_t log rho_t), C): length-normalised, so long responses are not all clipped
    (verl rollout_is="geometric"; GSPO's sequence ratio, arXiv 2507.18071, has the same form)."""
    layout = inputs.layout()
    seq = (layout.segment_sum(inputs.log_ratio()) / layout.tokens.clamp_min(1)).exp()  # [S]
    return _truncated(seq[layout.seq_index], inputs.log_ratio().exp(), inputs, cfg)


@register_rollout_correction("icepop")
def icepop(inputs: CorrectionInputs, cfg: RolloutCorrectionConfig):
    """Token-level masked IS (IcePop, Ring-1T, arXiv 2510.18855): w_t = rho_t if low <= rho_t <= high
    else 0 (the paper's alpha 0.5, beta 5); slime's icepop_function, TRL "token_mask" (upper bound
    only). A masked token still counts in the normaliser (module docstring)."""
    rho = inputs.log_ratio().exp()
    return _masked(rho, rho, inputs, cfg)


@register_rollout_correction("seq_mask")
def seq_mask(inputs: CorrectionInputs, cfg: RolloutCorrectionConfig):
    """Sequence-level masked IS: w_i = R_i if low <= R_i <= high else 0, R_i = prod_t rho_t (log
    clamped to [-20, 20]); TRL "sequence_mask", verl rollout_is="sequence" in mask mode."""
    layout = inputs.layout()
    seq = layout.segment_sum(inputs.log_ratio()).clamp(*LOG_RATIO_BOUNDS).exp()  # [S]
    return _masked(seq[layout.seq_index], inputs.log_ratio().exp(), inputs, cfg)


def _truncated(ratio, rho, inputs, cfg):
    """ratio [T] per token (a sequence's own on each of its tokens) -> min(ratio, C) on loss tokens."""
    maskf = inputs.mask.float()
    weight = ratio.clamp(max=cfg.clip) * maskf
    return weight, _metrics(weight, rho, inputs, truncated=(ratio > cfg.clip).float(),
                            masked=torch.zeros_like(maskf))


def _masked(ratio, rho, inputs, cfg):
    """ratio [T] -> ratio inside [low, high], 0 outside, on loss tokens."""
    maskf = inputs.mask.float()
    keep = (ratio >= cfg.low) & (ratio <= cfg.high)
    weight = torch.where(keep, ratio, 0.0) * maskf
    return weight, _metrics(weight, rho, inputs, truncated=torch.zeros_like(maskf), masked=(~keep).float())


def _metrics(weight, rho, inputs, truncated, masked):
    maskf = inputs.mask.float()
    log_rho = inputs.log_ratio()
    return {"rollout_mismatch_k1": _masked_mean(log_rho, maskf),
            "rollout_mismatch_k3": _masked_mean(rho - 1 - log_rho, maskf),
            "rollout_truncated_share": _masked_mean(truncated, maskf),
            "rollout_masked_share": _masked_mean(masked, maskf),
            "rollout_is_weight_mean": _masked_mean(weight, maskf)}


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp_min(1)


def ratio_quantiles(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor,
                    quantiles=(0.05, 0.5, 0.95)) -> dict[str, float]:
    """p5 / p50 / p95 of the token ratio rho = pi_old / pi_engine over the loss tokens of a whole
    batch (any shape), on the host: logged once per step, before the update."""
    selected = mask.bool()
    log_rho = (old_logprobs.float() - engine_logprobs.float())[selected].clamp(*LOG_RATIO_BOUNDS)
    if log_rho.numel() == 0:
        return {}
    values = torch.quantile(log_rho.exp().cpu(), torch.tensor(quantiles, dtype=torch.float32)).tolist()
    return {f"rollout_ratio_p{round(q * 100)}": v for q, v in zip(quantiles, values)}
