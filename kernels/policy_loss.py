"""Clipped policy-gradient loss with a KL penalty, from log-probs or fused with the LM head.

    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, cfg, ...)
    loss, metrics = fused_linear_policy_loss(hidden, weight, labels, old_logprobs, ..., cfg)

Tokens are flat [T] (packed); sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]. `cfg` selects
the variant: token ratio with asymmetric clip (PPO / DAPO clip-higher) and optional dual-clip, or
sequence ratio (GSPO); KL estimator none / k1 / k2 / k3; one of four aggregations. The formulas
and their verl lineage are in `kernels.reference.policy_loss_ref`, the specification.

Design:
- The loss is linear in per-token terms: loss = sum_t w_t (pg_t + kl_coef * kl_t), where the
  weights w_t depend only on the mask, the sequence layout, the mode and the normaliser. Passing
  the normaliser from outside (global token count, global number of sequences, or the Dr. GRPO
  constant) makes micro-batch and DP-rank losses add up to the big-batch loss.
- d loss / d logp_t is formed in closed form in the forward (`token_terms`: elementwise, a Triton
  kernel on GPU) and stored; backward only scales it. No gradient reaches old or reference
  log-probs or advantages.
- Fused with the head, the gradient w.r.t. hidden and weight is also finished in the forward. The
  torch path (CPU) goes through token blocks of full vocabulary rows: per block one logits matmul,
  the log-prob, the loss coefficient, then d logits -> d hidden (block) and d weight (accumulated).
  No logits are recomputed, which is what keeps it at the naive path's matmul cost. GSPO's
  coefficient needs the whole sequence's log-probs, so there it takes two passes (a statistics
  pass, then the gradient pass: 4/3 of the matmul work). The Triton path always does statistics
  kernel -> [T] coefficients -> per token chunk, a d logits kernel that recomputes the logits
  tiles, then d hidden and d weight as two cuBLAS GEMMs (`kernels.logprobs.logprobs_bwd_triton`:
  no atomics; why, in that module's docstring). All of it runs inside the forward call.
- A rollout-correction weight (`is_weight` [T], e.g. truncated importance sampling between the
  trainer's old policy and the rollout engine) multiplies the policy-gradient term only:
  loss = sum_t w_t (is_weight_t pg_t + kl_coef kl_t). It is applied to pg and d pg (so to the
  GSPO sequence gradient too) after the elementwise kernel, in torch, rather than folded into the
  advantages: folding (A -> is_weight A) would give the same pg for these clipped objectives
  (is_weight >= 0 keeps the sign of A, and every branch is linear in A), but it would change the
  clip metrics of masked tokens (A = 0 clips nothing) and it is wrong for losses that are not
  linear in A (intern_s1's NLL term). One [T] multiply costs nothing next to the head.
- Metrics are tensors (no .item()); they are this micro-batch's masked token means, except pg_loss
  and kl_loss which use the loss's own aggregation and normaliser.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.logprobs import (block_logits, block_stats, gather_sequence_parallel, head_backward,
                              head_forward, reduce_hidden_grad, resolve_impl, torch_block_rows, tp_rank)
from kernels.reference import AGGREGATIONS, KL_ESTIMATORS

TOKEN_LOG_RATIO_BOUNDS = (-20.0, 20.0)  # verl clamps the token log-ratio before exp
SEQ_LOG_RATIO_BOUNDS = (float("-inf"), 10.0)  # verl's GSPO clamps the sequence log-ratio above only
KL_CODES = {name: code for code, name in enumerate(KL_ESTIMATORS)}  # none 0, k1 1, k2 2, k3 3
FLAG_LOW, FLAG_HIGH, FLAG_DUAL = 1, 2, 4
BLOCK_TOKENS = 1024  # one program of the elementwise kernel


@dataclass(kw_only=True)
class PolicyLossConfig:
    ratio_level: str = "token"       # "token": PPO / DAPO; "sequence": GSPO (arXiv 2507.18071)
    eps_low: float = 0.2             # lower clip bound: ratio >= 1 - eps_low
    eps_high: float = 0.28           # DAPO clip-higher; = eps_low gives symmetric PPO
    clip_ratio_c: float | None = None  # dual-clip bound for negative advantages (e.g. 3.0); None = off
    kl_type: str = "none"            # KL(pi || pi_ref) estimator: none, k1, k2, k3 ("low-variance")
    kl_coef: float = 0.0
    aggregation: str = "token-mean"

    def __post_init__(self):
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")
        if not 0 < self.eps_low < 1:
            raise ValueError(f"eps_low must be in (0, 1), got {self.eps_low}")
        if not self.eps_high > 0:
            raise ValueError(f"eps_high must be > 0, got {self.eps_high}")
        if self.clip_ratio_c is not None and (self.clip_ratio_c <= 1 or self.ratio_level != "token"):
            raise ValueError(f"clip_ratio_c must be > 1 and needs ratio_level='token', got {self.clip_ratio_c}")
        if self.kl_type not in KL_ESTIMATORS:
            raise ValueError(f"kl_type must be one of {KL_ESTIMATORS}, got {self.kl_type!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


@dataclass
class TokenTerms:
    """Per-token pieces of the loss, all [T]: pg and its derivative w.r.t. the log-ratio, kl and
    its derivative w.r.t. logp, the (clamped) ratio, and FLAG_* bits saying which clip fired."""
    pg: torch.Tensor
    dpg: torch.Tensor
    kl: torch.Tensor
    dkl: torch.Tensor
    ratio: torch.Tensor
    flags: torch.Tensor

    @classmethod
    def empty(cls, T, device):
        f = lambda: torch.empty(T, dtype=torch.float32, device=device)  # noqa: E731
        return cls(f(), f(), f(), f(), f(), torch.empty(T, dtype=torch.uint8, device=device))

    def store(self, block, other):
        for name in ("pg", "dpg", "kl", "dkl", "ratio", "flags"):
            getattr(self, name)[block] = getattr(other, name)


# --------------------------------------------------------------------------------- Triton
@triton.jit
def _token_terms_kernel(log_ratio_ptr, adv_ptr, logp_ptr, ref_ptr,
                        pg_ptr, dpg_ptr, kl_ptr, dkl_ptr, ratio_ptr, flags_ptr,
                        N, eps_low, eps_high, clip_ratio_c, log_ratio_min, log_ratio_max,
                        BLOCK: tl.constexpr, HAS_DUAL: tl.constexpr, KL_TYPE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    log_ratio = tl.load(log_ratio_ptr + offs, mask=mask, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    in_bounds = (log_ratio >= log_ratio_min) & (log_ratio <= log_ratio_max)
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, log_ratio_min), log_ratio_max))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * tl.minimum(tl.maximum(ratio, 1 - eps_low), 1 + eps_high)
    clipped = pg_clipped > pg_unclipped
    pg = tl.maximum(pg_unclipped, pg_clipped)
    dpg_dratio = tl.where(clipped, 0.0, -adv)
    flags = tl.where(clipped & (ratio < 1 - eps_low), 1, 0) + tl.where(clipped & (ratio > 1 + eps_high), 2, 0)
    if HAS_DUAL:
        pg_dual = -adv * clip_ratio_c
        dual = (adv < 0) & (pg > pg_dual)
        pg = tl.where(dual, pg_dual, pg)
        dpg_dratio = tl.where(dual, 0.0, dpg_dratio)
        flags += tl.where(dual, 4, 0)
    tl.store(pg_ptr + offs, pg, mask=mask)
    tl.store(dpg_ptr + offs, tl.where(in_bounds, dpg_dratio * ratio, 0.0), mask=mask)
    tl.store(ratio_ptr + offs, ratio, mask=mask)
    tl.store(flags_ptr + offs, flags.to(tl.uint8), mask=mask)
    kl = tl.zeros([BLOCK], tl.float32)
    dkl = tl.zeros([BLOCK], tl.float32)
    if KL_TYPE != 0:
        diff = tl.load(logp_ptr + offs, mask=mask, other=0.0) - tl.load(ref_ptr + offs, mask=mask, other=0.0)
        if KL_TYPE == 1:
            kl = diff
            dkl = tl.full([BLOCK], 1.0, tl.float32)
        elif KL_TYPE == 2:
            kl = 0.5 * diff * diff
            dkl = diff
        else:  # k3 on x = ref - logp, x clamped to [-20, 20], result clamped to [-10, 10]
            x = tl.minimum(tl.maximum(-diff, -20.0), 20.0)
            raw = tl.exp(x) - x - 1
            kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
            passes = (-diff >= -20.0) & (-diff <= 20.0) & (raw <= 10.0)
            dkl = tl.where(passes, 1 - tl.exp(x), 0.0)
    tl.store(kl_ptr + offs, kl, mask=mask)
    tl.store(dkl_ptr + offs, dkl, mask=mask)


def token_terms_triton(log_ratio, advantages, logprobs, ref_logprobs, cfg, bounds):
    N = log_ratio.numel()
    terms = TokenTerms.empty(N, log_ratio.device)
    ref = ref_logprobs.float().contiguous() if ref_logprobs is not None else logprobs
    _token_terms_kernel[(triton.cdiv(N, BLOCK_TOKENS),)](
        log_ratio.float().contiguous(), advantages.contiguous(), logprobs.float().contiguous(), ref,
        terms.pg, terms.dpg, terms.kl, terms.dkl, terms.ratio, terms.flags,
        N, cfg.eps_low, cfg.eps_high, cfg.clip_ratio_c or 0.0, bounds[0], bounds[1],
        BLOCK=BLOCK_TOKENS, HAS_DUAL=cfg.clip_ratio_c is not None, KL_TYPE=KL_CODES[cfg.kl_type])
    return terms


# ---------------------------------------------------------------------------------- torch
def token_terms_torch(log_ratio, advantages, logprobs, ref_logprobs, cfg, bounds):
    """The same elementwise math as _token_terms_kernel, in plain torch."""
    adv = advantages.float()
    in_bounds = (log_ratio >= bounds[0]) & (log_ratio <= bounds[1])
    ratio = log_ratio.clamp(*bounds).exp()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    clipped = pg_clipped > pg_unclipped
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dpg_dratio = torch.where(clipped, 0.0, -adv)
    flags = (clipped & (ratio < 1 - cfg.eps_low)) * FLAG_LOW + (clipped & (ratio > 1 + cfg.eps_high)) * FLAG_HIGH
    if cfg.clip_ratio_c is not None:
        pg_dual = -adv * cfg.clip_ratio_c
        dual = (adv < 0) & (pg > pg_dual)
        pg = torch.where(dual, pg_dual, pg)
        dpg_dratio = torch.where(dual, 0.0, dpg_dratio)
        flags = flags + dual * FLAG_DUAL
    dpg = torch.where(in_bounds, dpg_dratio * ratio, 0.0)
    kl, dkl = _kl_torch(logprobs, ref_logprobs, cfg.kl_type)
    return TokenTerms(pg, dpg, kl, dkl, ratio, flags.to(torch.uint8))


def _kl_torch(logprobs, ref_logprobs, kl_type):
    if kl_type == "none":
        zero = torch.zeros_like(logprobs, dtype=torch.float32)
        return zero, zero
    diff = logprobs.float() - ref_logprobs.float()
    if kl_type == "k1":
        return diff, torch.ones_like(diff)
    if kl_type == "k2":
        return 0.5 * diff.square(), diff
    x = (-diff).clamp(-20, 20)
    raw = x.exp() - x - 1
    passes = (-diff >= -20) & (-diff <= 20) & (raw <= 10)
    return raw.clamp(-10, 10), torch.where(passes, 1 - x.exp(), 0.0)


def token_terms(log_ratio, advantages, logprobs, ref_logprobs, cfg, bounds, impl):
    fn = token_terms_triton if impl == "triton" else token_terms_torch
    return fn(log_ratio, advantages, logprobs, ref_logprobs, cfg, bounds)


# ---------------------------------------------------------------------------- aggregation
@dataclass
class SeqLayout:
    """Which sequence each token belongs to, and per-sequence sums. Under context parallelism
    (`cp_group`) each rank holds part of every sequence (cu_seqlens are the local boundaries) and
    the per-sequence sums are over the whole sequence: summed over the CP group, differentiably
    (an all-reduce whose backward sums the gradients of every rank) when the values need a grad."""
    seq_index: torch.Tensor  # [T] sequence of each token
    tokens: torch.Tensor     # [S] unmasked tokens per sequence (fp32)
    max_len: int             # longest sequence (with the sequence count, the Dr. GRPO default divisor)
    cp_group: object = None

    @classmethod
    def build(cls, mask, cu_seqlens, cp_group=None):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        seq_index = torch.repeat_interleave(torch.arange(len(lengths), device=mask.device), lengths.to(mask.device))
        tokens = torch.zeros(len(lengths), dtype=torch.float32, device=mask.device)
        tokens.index_add_(0, seq_index, mask.float())
        cp = 1 if cp_group is None else cp_group.size()
        layout = cls(seq_index, tokens, cp * int(lengths.max()) if len(lengths) else 0, cp_group if cp > 1 else None)
        layout.tokens = layout.over_cp(tokens)
        return layout

    def over_cp(self, per_sequence):
        """[S] partial sums of this rank's tokens -> the whole sequences' sums."""
        if self.cp_group is None:
            return per_sequence
        if per_sequence.requires_grad:
            import torch.distributed.nn.functional as dist_nn

            return dist_nn.all_reduce(per_sequence, group=self.cp_group)
        per_sequence = per_sequence.clone()
        torch.distributed.all_reduce(per_sequence, group=self.cp_group)
        return per_sequence

    def segment_sum(self, values):
        return self.over_cp(torch.zeros_like(self.tokens, dtype=values.dtype).index_add(0, self.seq_index, values))


def aggregation_weights(mask, layout: SeqLayout, mode, normalizer=None):
    """w [T] with agg(values) = sum(w * values); `normalizer` replaces the mode's default divisor."""
    m = mask.float()
    if mode == "token-mean":
        default = m.sum().clamp_min(1)
    elif mode == "seq-mean-token-sum-norm":  # Dr. GRPO: every sequence x the (padded) length
        default = max(len(layout.tokens) * layout.max_len, 1)
    else:
        default = (layout.tokens > 0).sum().clamp_min(1)
        if mode == "seq-mean-token-mean":
            m = m / layout.tokens.clamp_min(1)[layout.seq_index]
    return m / (default if normalizer is None else normalizer)


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp_min(1)


def weigh_pg(terms, is_weight):
    """The policy-gradient term (and its derivative) times the per-token rollout-correction weight."""
    if is_weight is not None:
        w = is_weight.detach().float()
        terms.pg, terms.dpg = terms.pg * w, terms.dpg * w
    return terms


def loss_and_coefficients(logprobs, old_logprobs, advantages, mask, layout, cfg, ref_logprobs, weights, impl,
                          is_weight=None):
    """(terms, d loss / d logprobs [T]) for all tokens at once; handles both ratio levels."""
    if cfg.ratio_level == "token":
        terms = weigh_pg(token_terms(logprobs - old_logprobs, advantages, logprobs, ref_logprobs, cfg,
                                     TOKEN_LOG_RATIO_BOUNDS, impl), is_weight)
        return terms, token_coefficients(terms, weights, cfg)
    # GSPO: log s_i = mean over sequence i's unmasked tokens of (logp - old); d log s_i / d logp_t = m_t / n_i
    maskf = mask.float()
    per_token = layout.tokens.clamp_min(1)[layout.seq_index]
    seq_log_ratio = layout.segment_sum((logprobs - old_logprobs) * maskf) / layout.tokens.clamp_min(1)
    terms = weigh_pg(token_terms(seq_log_ratio[layout.seq_index], advantages, logprobs, ref_logprobs, cfg,
                                 SEQ_LOG_RATIO_BOUNDS, impl), is_weight)
    d_seq = layout.segment_sum(weights * terms.dpg)  # d loss / d log s_i
    coef = d_seq[layout.seq_index] * maskf / per_token + cfg.kl_coef * weights * terms.dkl
    return terms, coef


def token_coefficients(terms, weights, cfg):
    """d loss / d logp for token-level ratios: w_t (d pg_t / d log r_t + kl_coef * d kl_t / d logp_t)."""
    return weights * (terms.dpg + cfg.kl_coef * terms.dkl)


def finish(terms, weights, mask, cfg, logprobs, old_logprobs, entropy):
    """Loss and metrics (tensors) from the per-token terms."""
    maskf = mask.float()
    pg_loss = (weights * terms.pg).sum()
    metrics = {"pg_loss": pg_loss}
    loss = pg_loss.clone()  # a tensor of its own: the metrics are marked non-differentiable
    if cfg.kl_type != "none":
        metrics["kl_loss"] = (weights * terms.kl).sum()
        loss = loss + cfg.kl_coef * metrics["kl_loss"]
    selected = mask.bool()
    has_tokens = selected.any()
    metrics.update(
        clipfrac_low=_masked_mean(((terms.flags & FLAG_LOW) > 0).float(), maskf),
        clipfrac_high=_masked_mean(((terms.flags & FLAG_HIGH) > 0).float(), maskf),
        clipfrac_dual=_masked_mean(((terms.flags & FLAG_DUAL) > 0).float(), maskf),
        approx_kl=_masked_mean(old_logprobs.float() - logprobs, maskf),
        ratio_min=torch.where(has_tokens, terms.ratio.masked_fill(~selected, float("inf")).min(), 1.0),
        ratio_max=torch.where(has_tokens, terms.ratio.masked_fill(~selected, float("-inf")).max(), 1.0),
        ratio_mean=_masked_mean(terms.ratio, maskf),
    )
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, maskf)
    return loss, metrics


# ------------------------------------------------------------------- from log-probs (op 2a)
class PolicyLoss(torch.autograd.Function):
    """loss(logprobs); the gradient is formed in the forward, backward scales it."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, cfg, normalizer,
                entropy, impl, is_weight, cp_group):
        logprobs = logprobs.float()
        old_logprobs = logprobs if old_logprobs is None else old_logprobs.float()  # None: on-policy
        layout = SeqLayout.build(mask, cu_seqlens, cp_group)
        weights = aggregation_weights(mask, layout, cfg.aggregation, normalizer)
        terms, coef = loss_and_coefficients(logprobs, old_logprobs, advantages, mask, layout, cfg,
                                            ref_logprobs, weights, impl, is_weight)
        loss, metrics = finish(terms, weights, mask, cfg, logprobs, old_logprobs, entropy)
        ctx.save_for_backward(coef)
        ctx.mark_non_differentiable(*metrics.values())
        return loss, *metrics.values()

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (coef,) = ctx.saved_tensors
        return (grad_loss * coef,) + (None,) * 11


def policy_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, cfg: PolicyLossConfig,
                ref_logprobs=None, normalizer=None, entropy=None, impl: str = "auto", is_weight=None,
                cp_group=None):
    """(loss, metrics) for flat [T] tokens; see the module docstring. Differentiable w.r.t. logprobs
    only. `is_weight` [T] (None = 1) multiplies the policy-gradient term, not the KL term. Under
    context parallelism the tokens are this rank's share (cu_seqlens its local boundaries) and
    `cp_group` sums the sequence statistics; the loss is then this rank's part of the whole, and
    its gradient the whole loss's w.r.t. these tokens. old_logprobs None: on-policy (the detached
    logprobs are pi_old, as in fused_linear_policy_loss)."""
    _check_inputs(cfg, ref_logprobs)
    impl = resolve_impl(impl, logprobs)
    loss, *values = PolicyLoss.apply(logprobs, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, cfg,
                                     normalizer, entropy, impl, is_weight, cp_group)
    return loss, dict(zip(_metric_names(cfg, entropy is not None), values))


def _metric_names(cfg, has_entropy):
    names = ["pg_loss"] + (["kl_loss"] if cfg.kl_type != "none" else [])
    names += ["clipfrac_low", "clipfrac_high", "clipfrac_dual", "approx_kl", "ratio_min", "ratio_max", "ratio_mean"]
    return names + (["entropy"] if has_entropy else [])


def _check_inputs(cfg, ref_logprobs):
    if cfg.kl_type != "none" and ref_logprobs is None:
        raise ValueError(f"kl_type={cfg.kl_type!r} needs ref_logprobs")


# ------------------------------------------------------------------ fused with the head (op 2b)
def _one_pass_torch(hidden, weight, labels, old_logprobs, advantages, ref_logprobs, weights, cfg, temperature,
                    group, compute_entropy, is_weight=None):
    """Token-level ratios on the torch path: one logits matmul per token block, gradients finished
    in the same pass. -> (logprobs, entropy, terms, d hidden partial fp32, d weight fp32)."""
    (T, H), V = hidden.shape, weight.shape[0]
    vocab_start = tp_rank(group) * V
    fp32 = hidden.dtype == torch.float32
    weight32 = weight if fp32 else weight.float()
    dh = torch.empty(T, H, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    logprobs = torch.empty(T, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logprobs) if compute_entropy else None
    terms = TokenTerms.empty(T, hidden.device)
    rows = torch_block_rows(V)
    for start in range(0, T, rows):
        block = slice(start, min(start + rows, T))
        z = block_logits(hidden[block], weight, temperature)  # [Tb, V/tp] fp32
        e, sumexp, _, logp, ent = block_stats(z, labels[block], vocab_start, group, compute_entropy)
        ref = ref_logprobs[block] if ref_logprobs is not None else None
        old = logp if old_logprobs is None else old_logprobs[block].float()  # None: on-policy, ratio 1
        block_terms = weigh_pg(token_terms_torch(logp - old, advantages[block], logp, ref, cfg, TOKEN_LOG_RATIO_BOUNDS),
                               is_weight[block] if is_weight is not None else None)
        coef = token_coefficients(block_terms, weights[block], cfg) / temperature
        # d loss / d logits = coef * (onehot - e / sumexp). The row scales and the one-hot term are
        # applied to the [Tb, H] operands, not to the [Tb, V] block: one pass less over the block.
        scale = (-coef / sumexp).unsqueeze(1)
        hidden_block = hidden[block] if fp32 else hidden[block].float()
        torch.mm(e, weight32, out=dh[block])
        dh[block] *= scale
        dw.addmm_(e.t(), hidden_block * scale)
        local = labels[block].long() - vocab_start
        owned = ((local >= 0) & (local < V)).nonzero().squeeze(1)
        dh[block][owned] += coef[owned].unsqueeze(1) * weight32[local[owned]]
        dw.index_add_(0, local[owned], coef[owned].unsqueeze(1) * hidden_block[owned])
        logprobs[block] = logp
        terms.store(block, block_terms)
        if compute_entropy:
            entropy[block] = ent
        del z, e  # before the next block is allocated: one [Tb, V] block alive, not two
    return logprobs, entropy, terms, dh, dw


class FusedLinearPolicyLoss(torch.autograd.Function):
    """loss(hidden, weight) with d hidden and d weight computed in the forward (no recompute on
    the torch token-level path); backward returns them scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, cfg,
                normalizer, temperature, tp_group, sequence_parallel, compute_entropy, impl, is_weight, cp_group):
        hidden_full = gather_sequence_parallel(hidden, tp_group) if sequence_parallel else hidden
        layout = SeqLayout.build(mask, cu_seqlens, cp_group)
        weights = aggregation_weights(mask, layout, cfg.aggregation, normalizer)
        if impl == "torch" and cfg.ratio_level == "token":
            logprobs, entropy, terms, dh, dw = _one_pass_torch(
                hidden_full, weight, labels, old_logprobs, advantages, ref_logprobs, weights, cfg, temperature,
                tp_group, compute_entropy, is_weight)
            dh, dw = dh.to(hidden.dtype), dw.to(weight.dtype)
        else:
            lse, logprobs, entropy = head_forward(hidden_full, weight, labels, temperature, tp_group,
                                                  compute_entropy, impl)
            old = logprobs if old_logprobs is None else old_logprobs.float()  # None: on-policy, ratio 1
            terms, coef = loss_and_coefficients(logprobs, old, advantages, mask, layout, cfg,
                                                ref_logprobs, weights, impl, is_weight)
            dh, dw = head_backward(hidden_full, weight, labels, temperature, tp_group, lse, entropy, coef, None, impl)
        ctx.save_for_backward(reduce_hidden_grad(dh, tp_group, sequence_parallel), dw)
        loss, metrics = finish(terms, weights, mask, cfg, logprobs, logprobs if old_logprobs is None else old_logprobs,
                               entropy)
        ctx.mark_non_differentiable(logprobs, *metrics.values())
        return loss, logprobs, *metrics.values()

    @staticmethod
    def backward(ctx, grad_loss, *_):
        dh, dw = ctx.saved_tensors
        # In place: a second [V, H] buffer would add to the peak (so retain_graph=True is unsupported).
        return (dh.mul_(grad_loss), dw.mul_(grad_loss)) + (None,) * 15


def fused_linear_policy_loss(hidden, weight, labels, old_logprobs, advantages, mask, cu_seqlens,
                             cfg: PolicyLossConfig, ref_logprobs=None, normalizer=None, temperature: float = 1.0,
                             tp_group=None, sequence_parallel: bool = False, compute_entropy: bool = False,
                             impl: str = "auto", is_weight=None, cp_group=None):
    """Head + log-probs + policy loss in one op: (loss, metrics); metrics["logprobs"] holds the
    detached [T] log-probs. hidden [T, H] ([T/tp, H] under sequence parallelism), weight [V/tp, H],
    labels and the per-token inputs [T] (full on every TP rank). Differentiable w.r.t. hidden and
    weight; the loss must be used as is (a scalar multiple is fine, e.g. loss scaling), since the
    gradient was formed in the forward. `is_weight` [T] and `cp_group` as in policy_loss.
    old_logprobs None: on-policy (one optimizer step per rollout batch, the weights that would
    recompute pi_old are these), the old log-probs are the detached ones computed here, each ratio
    exactly 1 and its gradient that of pi / pi.detach(); metrics["logprobs"] are then pi_old."""
    _check_inputs(cfg, ref_logprobs)
    impl = resolve_impl(impl, hidden)
    loss, logprobs, *values = FusedLinearPolicyLoss.apply(
        hidden, weight, labels, old_logprobs, advantages, mask, cu_seqlens, ref_logprobs, cfg, normalizer,
        float(temperature), tp_group, sequence_parallel, compute_entropy, impl, is_weight, cp_group)
    metrics = dict(zip(_metric_names(cfg, compute_entropy), values))
    metrics["logprobs"] = logprobs
    return loss, metrics
