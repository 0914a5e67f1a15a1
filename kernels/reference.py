"""Plain-torch definitions of every op in `kernels/`: the specification the fast paths are tested against.

Each function is written to be obviously right rather than fast: full [T, V] logits, autograd for
every gradient, Python loops over sequences. Tests compare the torch and Triton paths with these; the
benchmark runs them as the "reference" provider. Vocab parallelism is not modelled here: the
reference is the TP=1 answer that TP=2 must reproduce.

Loss semantics follow verl 0.9.1 (`core_algos.compute_policy_loss`, `agg_loss`, `kl_penalty`):
the token log-ratio is clamped to [-20, 20], the k3 estimator to [-10, 10] (its log-ratio to
[-20, 20]), GSPO's sequence log-ratio to at most 10. Where we depart from verl: the normaliser of
every aggregation mode can be passed in (so micro-batches and DP ranks sum to the big-batch loss),
and GSPO differentiates through the geometric mean as in the paper (arXiv 2507.18071); with
per-sequence advantages and seq-mean-token-mean this gives verl's gradient exactly.
"""
import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("none", "k1", "k2", "k3")


# ----------------------------------------------------------------------------------- log-probs
def linear_logprobs_ref(hidden, weight, labels, temperature: float = 1.0):
    """log p(label) and entropy of softmax(hidden @ weight^T / temperature), via full fp32 logits.

    hidden [T, H], weight [V, H], labels [T] -> (logprobs [T] fp32, entropy [T] fp32).
    """
    logits = (hidden @ weight.t()).float() / temperature  # [T, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


# ------------------------------------------------------------------------------- policy loss
def _sequences(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return [slice(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def kl_penalty_ref(logprobs, ref_logprobs, kl_type: str):
    """Per-token KL estimate of KL(pi || pi_ref) from sampled tokens (Schulman's k1, k2, k3)."""
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kl_type == "k3":  # "low_var_kl" in verl
        log_ratio = (ref_logprobs - logprobs).clamp(-20, 20)
        return (log_ratio.exp() - log_ratio - 1).clamp(-10, 10)
    raise ValueError(f"kl_type must be one of {KL_ESTIMATORS[1:]}, got {kl_type!r}")


def aggregate_ref(values, mask, cu_seqlens, mode: str, normalizer=None):
    """Reduce per-token values [T] to a scalar the way `mode` says; `normalizer` overrides the divisor.

    token-mean: sum(m*v) / tokens.  seq-mean-token-sum: sum over sequences of sum(m*v) / sequences.
    seq-mean-token-mean: sum over sequences of mean(v) / sequences.  seq-mean-token-sum-norm:
    sum(m*v) / (S * L), a constant (Dr. GRPO, arXiv 2503.20783: 1/G sum_i 1/MAX_TOKENS sum_t;
    verl 0.9.1 `agg_loss`): S every sequence of the batch, masked or not, and L by default the
    longest sequence (verl's padded length). For the other seq-mean modes "sequences" counts only
    sequences with at least one unmasked token.
    """
    mask = mask.to(values.dtype)
    seqs = _sequences(cu_seqlens)
    if mode == "token-mean":
        total, default = (values * mask).sum(), mask.sum()
    elif mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        total, default = values.new_zeros(()), 0
        for s in seqs:
            tokens = mask[s].sum()
            if tokens > 0:
                seq_sum = (values[s] * mask[s]).sum()
                total = total + (seq_sum / tokens if mode == "seq-mean-token-mean" else seq_sum)
                default += 1
    elif mode == "seq-mean-token-sum-norm":
        total, default = (values * mask).sum(), len(seqs) * max(s.stop - s.start for s in seqs)
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    divisor = default if normalizer is None else normalizer
    return total / divisor


def _masked_mean(values, mask):
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def policy_loss_ref(logprobs, old_logprobs, advantages, mask, cu_seqlens, cfg, ref_logprobs=None,
                    normalizer=None, entropy=None, is_weight=None):
    """Clipped policy-gradient loss plus KL penalty, and its metrics. Tokens are flat [T]; sequence i
    is tokens cu_seqlens[i]:cu_seqlens[i+1]. `cfg` carries ratio_level ("token" | "sequence"),
    eps_low, eps_high, clip_ratio_c (dual-clip, None = off), kl_type, kl_coef, aggregation.

    token:    r_t = exp(clamp(logp_t - old_t, -20, 20))
    sequence: r_t = s_i = exp(min(mean_{t in i, masked}(logp_t - old_t), 10))   (GSPO)
    pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)); with dual-clip and A_t < 0,
    pg_t = min(pg_t, -A_t clip_ratio_c). loss = agg(w_t * pg_t) + kl_coef * agg(kl), where w_t is
    `is_weight` (a rollout-correction weight, constant: no gradient; None = 1). The clip metrics
    describe the policy ratio and do not see w.
    """
    if cfg.ratio_level == "token":
        log_ratio = (logprobs - old_logprobs).clamp(-20, 20)
    else:
        maskf = mask.to(logprobs.dtype)
        parts = []
        for s in _sequences(cu_seqlens):
            seq_log_ratio = ((logprobs[s] - old_logprobs[s]) * maskf[s]).sum() / maskf[s].sum().clamp_min(1)
            parts.append(seq_log_ratio.clamp(max=10).expand(s.stop - s.start))
        log_ratio = torch.cat(parts)
    ratio = log_ratio.exp()
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dual_clipped = torch.zeros_like(mask, dtype=torch.bool)
    if cfg.clip_ratio_c is not None:
        pg_dual = -advantages * cfg.clip_ratio_c
        dual_clipped = (advantages < 0) & (pg > pg_dual)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg_dual), pg)
    weighted = pg if is_weight is None else pg * is_weight.detach()
    loss = pg_loss = aggregate_ref(weighted, mask, cu_seqlens, cfg.aggregation, normalizer)
    metrics = {"pg_loss": pg_loss.detach()}
    if cfg.kl_type != "none":
        kl = kl_penalty_ref(logprobs, ref_logprobs, cfg.kl_type)
        kl_loss = aggregate_ref(kl, mask, cu_seqlens, cfg.aggregation, normalizer)
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    clipped = pg_clipped > pg_unclipped
    ratio_m = ratio.detach()[mask.bool()]
    metrics.update(
        clipfrac_low=_masked_mean((clipped & (ratio < 1 - cfg.eps_low)).float(), mask),
        clipfrac_high=_masked_mean((clipped & (ratio > 1 + cfg.eps_high)).float(), mask),
        clipfrac_dual=_masked_mean(dual_clipped.float(), mask),
        approx_kl=_masked_mean((old_logprobs - logprobs).detach(), mask),
        ratio_min=ratio_m.min() if ratio_m.numel() else ratio.new_ones(()),
        ratio_max=ratio_m.max() if ratio_m.numel() else ratio.new_ones(()),
        ratio_mean=_masked_mean(ratio.detach(), mask),
    )
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach(), mask)
    return loss, metrics


# ----------------------------------------------------------------------------------- packing
def pack_ref(padded, lengths):
    """[B, L, ...] padded samples -> [sum(lengths), ...] with sample b's first lengths[b] rows."""
    return torch.cat([padded[b, :n] for b, n in enumerate(lengths.tolist())])


def unpack_ref(packed, cu_seqlens, max_len: int, fill=0):
    """Inverse of pack_ref: [T, ...] -> [B, max_len, ...], rows past each length set to `fill`."""
    bounds = cu_seqlens.tolist()
    out = packed.new_full((len(bounds) - 1, max_len, *packed.shape[1:]), fill)
    for b in range(len(bounds) - 1):
        out[b, : bounds[b + 1] - bounds[b]] = packed[bounds[b]: bounds[b + 1]]
    return out


def thd_attention_mask_ref(cu_seqlens, causal: bool = True):
    """Dense mask a packed THD batch stands for: True where attention is NOT allowed (megatron's
    convention). Token q sees token k only inside its own sample and, if causal, only k <= q."""
    total = int(cu_seqlens[-1])
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for s in _sequences(cu_seqlens):
        block = torch.ones(s.stop - s.start, s.stop - s.start, dtype=torch.bool)
        allowed[s, s] = torch.tril(block) if causal else block
    return ~allowed
