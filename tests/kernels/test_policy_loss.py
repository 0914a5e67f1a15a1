"""policy_loss and fused_linear_policy_loss against kernels.reference.policy_loss_ref."""
import itertools
from dataclasses import replace

import pytest
import torch

from kernels.policy_loss import PolicyLossConfig, SeqLayout, aggregation_weights, fused_linear_policy_loss, policy_loss
from kernels.reference import AGGREGATIONS, aggregate_ref, linear_logprobs_ref, policy_loss_ref
from tests.utils import assert_close

VARIANTS = {
    "ppo": dict(eps_low=0.2, eps_high=0.2),
    "dapo_k3": dict(eps_low=0.2, eps_high=0.28, kl_type="k3", kl_coef=0.1),
    "dual_clip_k1": dict(clip_ratio_c=3.0, kl_type="k1", kl_coef=0.05),
    "k2": dict(kl_type="k2", kl_coef=0.1),
    "gspo_k3": dict(ratio_level="sequence", eps_low=0.05, eps_high=0.08, kl_type="k3", kl_coef=0.1),
}
# Sequences of 10, 1, 19, 0 and 17 tokens: a single-token and an empty sequence included.
CU_SEQLENS = torch.tensor([0, 10, 11, 30, 30, 47])
IMPLS = ["torch", "triton"]
# fp32 against an autograd reference doing the same arithmetic in another order: observed <= 1e-6.
FP32 = dict(atol=1e-5, rtol=1e-5)


def _token_inputs(T, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(T, generator=g) * 5
    old = logp + spread * torch.randn(T, generator=g)  # ratios spread over the clip region
    ref = logp + spread * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    mask = torch.rand(T, generator=g) > 0.2
    mask[10] = False  # sequence 1 (one token) fully masked: "empty" for the seq-mean modes
    return logp, old, ref, adv, mask


def _config(variant, aggregation):
    return PolicyLossConfig(aggregation=aggregation, **VARIANTS[variant])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant,aggregation", list(itertools.product(VARIANTS, AGGREGATIONS)))
def test_loss_gradient_and_metrics_match_reference(variant, aggregation, impl):
    cfg = _config(variant, aggregation)
    logp, old, ref, adv, mask = _token_inputs(47)
    entropy = torch.rand(47)
    ours_logp, ref_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, metrics = policy_loss(ours_logp, old, adv, mask, CU_SEQLENS, cfg, ref_logprobs=ref, entropy=entropy,
                                impl=impl)
    loss.backward()
    expected, expected_metrics = policy_loss_ref(ref_logp, old, adv, mask, CU_SEQLENS, cfg, ref_logprobs=ref,
                                                 entropy=entropy)
    expected.backward()
    assert_close(loss, expected, **FP32, name="loss")
    assert_close(ours_logp.grad, ref_logp.grad, **FP32, name="d_logprobs")
    assert set(metrics) == set(expected_metrics)
    for name in metrics:
        assert_close(metrics[name], expected_metrics[name], **FP32, name=name)


def test_closed_form_on_policy_token_mean():
    # logp == old: ratio 1, nothing clipped, loss = -mean(A) over unmasked tokens, d loss/d logp = -A/n.
    logp, _, _, adv, mask = _token_inputs(47)
    logp.requires_grad_()
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask, CU_SEQLENS, PolicyLossConfig(), impl="torch")
    loss.backward()
    n = mask.sum()
    assert_close(loss, -(adv * mask).sum() / n, atol=1e-6, rtol=0, name="loss")
    assert_close(logp.grad, -adv * mask / n, atol=1e-7, rtol=0, name="d_logprobs")
    assert metrics["clipfrac_low"] == 0 and metrics["clipfrac_high"] == 0 and metrics["ratio_mean"] == 1


# ------------------------------------------------------------- rollout-correction weight
def _is_weight(T, seed=3):
    """Non-negative per-token weights with exact zeros (masked IS) and values above 1 (TIS)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(T, generator=g) * 2
    w[::5] = 0.0
    return w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant,aggregation", [("dapo_k3", "token-mean"), ("dual_clip_k1", "seq-mean-token-sum"),
                                                 ("gspo_k3", "seq-mean-token-mean"), ("ppo", "seq-mean-token-sum-norm")])
def test_is_weight_scales_the_pg_term_only(variant, aggregation, impl):
    cfg = _config(variant, aggregation)
    logp, old, ref, adv, mask = _token_inputs(47)
    w = _is_weight(47).requires_grad_()  # requires grad: none may arrive
    ours, expected_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss, metrics = policy_loss(ours, old, adv, mask, CU_SEQLENS, cfg, ref_logprobs=ref, impl=impl,
                                is_weight=w)
    loss.backward()
    expected, expected_metrics = policy_loss_ref(expected_logp, old, adv, mask, CU_SEQLENS, cfg, ref_logprobs=ref,
                                                 is_weight=w)
    expected.backward()
    assert_close(loss, expected, **FP32, name="loss")
    assert_close(ours.grad, expected_logp.grad, **FP32, name="d_logprobs")
    assert w.grad is None
    for name in expected_metrics:
        assert_close(metrics[name], expected_metrics[name], **FP32, name=name)
    if cfg.ratio_level == "token":  # closed form: the weighted loss is the unweighted one with w * pg per token
        plain, _ = policy_loss_ref(logp, old, adv, mask, CU_SEQLENS, replace(cfg, kl_type="none"))
        scaled, _ = policy_loss_ref(logp, old, adv * w.detach(), mask, CU_SEQLENS, replace(cfg, kl_type="none"))
        weighted, _ = policy_loss_ref(logp, old, adv, mask, CU_SEQLENS, replace(cfg, kl_type="none"),
                                      is_weight=w.detach())
        assert_close(weighted, scaled, **FP32, name="w pg = pg with w A (linear in A)")
        assert not torch.allclose(weighted, plain)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["dapo_k3", "gspo_k3"])
def test_fused_is_weight_matches_reference(impl, variant):
    T, V, H, cu = FUSED_SHAPES[1]
    cfg = _config(variant, "token-mean")
    hidden, weight, labels, old, ref, adv, mask = _head_inputs(T, V, H, torch.float32)
    w = _is_weight(T)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_linear_policy_loss(h1, w1, labels, old, adv, mask, cu, cfg, ref_logprobs=ref, impl=impl,
                                       is_weight=w)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _ = linear_logprobs_ref(h2, w2, labels)
    expected, _ = policy_loss_ref(logp, old, adv, mask, cu, cfg, ref_logprobs=ref, is_weight=w)
    expected.backward()
    assert_close(loss, expected, **FP32, name="loss")
    assert_close(h1.grad, h2.grad, **FP32, name="d_hidden")
    assert_close(w1.grad, w2.grad, **FP32, name="d_weight")


def test_dr_grpo_default_divisor_is_sequences_times_longest():
    # 3 sequences (one empty, one fully masked) of at most 4 tokens: divisor 3 * 4, masked or not
    cu = torch.tensor([0, 4, 4, 6])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    mask = torch.tensor([1, 1, 0, 1, 0, 0])
    expected = (1 + 2 + 4) / (3 * 4)
    assert aggregate_ref(values, mask, cu, "seq-mean-token-sum-norm").item() == pytest.approx(expected)
    layout = SeqLayout.build(mask, cu)
    weights = aggregation_weights(mask, layout, "seq-mean-token-sum-norm")
    assert (weights * values).sum().item() == pytest.approx(expected)


# -------------------------------------------------------------------------- gradient flow
def _clip_cases():
    """Token 0: A>0, ratio 1.5 (clipped high); 1: A<0, ratio 0.5 (clipped low); 2: A<0, ratio 5
    (dual-clipped at 3); 3: A>0, ratio 1.1 (inside)."""
    old = torch.full((4,), -2.0)
    logp = old + torch.log(torch.tensor([1.5, 0.5, 5.0, 1.1]))
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    return logp, old, adv, torch.ones(4, dtype=torch.bool), torch.tensor([0, 4])


@pytest.mark.parametrize("impl", IMPLS)
def test_clipped_tokens_get_zero_gradient_and_nothing_reaches_old_ref_or_advantages(impl):
    logp, old, adv, mask, cu = _clip_cases()
    logp.requires_grad_()
    old.requires_grad_(), adv.requires_grad_()
    ref = (old.detach() + 0.1).requires_grad_()
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0, kl_type="k3", kl_coef=0.0)
    loss, metrics = policy_loss(logp, old, adv, mask, cu, cfg, ref_logprobs=ref, impl=impl)
    loss.backward()
    assert (logp.grad[:3] == 0).all() and logp.grad[3] != 0, logp.grad
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert metrics["clipfrac_high"] == 0.25 and metrics["clipfrac_low"] == 0.25 and metrics["clipfrac_dual"] == 0.25


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_clipped_token_leaves_its_hidden_row_untouched(impl):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(4, 32, generator=g), torch.randn(300, 32, generator=g) * 0.3
    labels = torch.randint(0, 300, (4,), generator=g)
    logp = linear_logprobs_ref(hidden, weight, labels)[0]
    _, _, adv, mask, cu = _clip_cases()
    old = logp - torch.log(torch.tensor([1.5, 0.5, 5.0, 1.1]))  # the same ratios as _clip_cases
    old.requires_grad_()
    hidden.requires_grad_(), weight.requires_grad_()
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28, clip_ratio_c=3.0)
    loss, _ = fused_linear_policy_loss(hidden, weight, labels, old, adv, mask, cu, cfg, impl=impl)
    loss.backward()
    assert (hidden.grad[:3] == 0).all() and (hidden.grad[3] != 0).any()
    assert old.grad is None


# ------------------------------------------------------------------------------ fused head
FUSED_SHAPES = [(64, 512, 64, torch.tensor([0, 16, 32, 48, 64])), (47, 1237, 96, CU_SEQLENS)]


def _head_inputs(T, V, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    base, old, ref, adv, mask = _token_inputs(T, seed)
    logp = linear_logprobs_ref(hidden.float(), weight.float(), labels)[0]
    # old / ref log-probs keep _token_inputs' offsets, now around the head's own log-probs
    return hidden, weight, labels, logp + (old - base), logp + (ref - base), adv, mask


def _fused_vs_reference(impl, T, V, H, cu, cfg, dtype, temperature=1.0):
    hidden, weight, labels, old, ref, adv, mask = _head_inputs(T, V, H, dtype)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fused_linear_policy_loss(h1, w1, labels, old, adv, mask, cu, cfg, ref_logprobs=ref,
                                             temperature=temperature, compute_entropy=True, impl=impl)
    loss.backward()
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp, ent = linear_logprobs_ref(h2, w2, labels, temperature)
    expected, expected_metrics = policy_loss_ref(logp, old, adv, mask, cu, cfg, ref_logprobs=ref, entropy=ent)
    expected.backward()
    return (loss, h1.grad, w1.grad, metrics), (expected, h2.grad, w2.grad, expected_metrics)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,V,H,cu", FUSED_SHAPES)
@pytest.mark.parametrize("variant", ["dapo_k3", "dual_clip_k1", "gspo_k3"])
def test_fused_fp32_matches_reference(impl, T, V, H, cu, variant):
    cfg = _config(variant, "seq-mean-token-mean" if variant.startswith("gspo") else "token-mean")
    (loss, dh, dw, metrics), (e_loss, e_dh, e_dw, e_metrics) = _fused_vs_reference(
        impl, T, V, H, cu, cfg, torch.float32, temperature=0.9)
    assert_close(loss, e_loss, **FP32, name="loss")
    assert_close(dh, e_dh, **FP32, name="d_hidden")
    assert_close(dw, e_dw, **FP32, name="d_weight")
    assert_close(metrics["logprobs"], linear_logprobs_ref(*_head_inputs(T, V, H, torch.float32)[:3], 0.9)[0],
                 atol=1e-4, rtol=1e-5, name="logprobs")  # as in test_logprobs: fp32 sums in another order
    for name in e_metrics:
        assert_close(metrics[name], e_metrics[name], atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["dapo_k3", "dual_clip_k1", "gspo_k3"])
def test_on_policy_old_none_is_the_reference_at_old_equal_current(impl, variant):
    """old_logprobs=None (on-policy): pi_old is the op's own detached log-probs, so loss, gradients
    and metrics are the reference's with old = the current log-probs (every ratio exactly 1, no
    token clipped, approx_kl 0), fused with the head and from log-probs alike."""
    T, V, H, cu = FUSED_SHAPES[1]
    cfg = _config(variant, "seq-mean-token-mean" if variant.startswith("gspo") else "token-mean")
    hidden, weight, labels, _, ref, adv, mask = _head_inputs(T, V, H, torch.float32)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fused_linear_policy_loss(h1, w1, labels, None, adv, mask, cu, cfg, ref_logprobs=ref,
                                             temperature=0.9, compute_entropy=True, impl=impl)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = linear_logprobs_ref(h2, w2, labels, 0.9)
    expected, expected_metrics = policy_loss_ref(logp, logp.detach(), adv, mask, cu, cfg, ref_logprobs=ref,
                                                 entropy=ent)
    expected.backward()
    assert_close(loss, expected, **FP32, name="loss")
    assert_close(h1.grad, h2.grad, **FP32, name="d_hidden")
    assert_close(w1.grad, w2.grad, **FP32, name="d_weight")
    for name in expected_metrics:
        assert_close(metrics[name], expected_metrics[name], atol=1e-5, rtol=1e-5, name=name)
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0
    assert float(metrics["approx_kl"]) == 0.0 and float(metrics["clipfrac_high"]) == 0.0
    lp = logp.detach().clone().requires_grad_()
    loss2, metrics2 = policy_loss(lp, None, adv, mask, cu, cfg, ref_logprobs=ref, impl=impl)
    loss2.backward()
    lp_ref = logp.detach().clone().requires_grad_()
    expected2, _ = policy_loss_ref(lp_ref, logp.detach(), adv, mask, cu, cfg, ref_logprobs=ref)
    expected2.backward()
    assert_close(loss2, expected2, **FP32, name="loss from log-probs")
    assert_close(lp.grad, lp_ref.grad, **FP32, name="d logprobs")
    assert float(metrics2["approx_kl"]) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_bf16_against_fp32_reference(impl):
    T, V, H, cu = FUSED_SHAPES[1]
    cfg = _config("dapo_k3", "token-mean")
    (loss, dh, dw, _), (e_loss, e_dh, e_dw, _) = _fused_vs_reference(impl, T, V, H, cu, cfg, torch.bfloat16)
    # bf16 logits (torch path) move log-probs by up to ~0.04 (see test_logprobs); the loss is a mean
    # of ratio terms of O(1): 2% relative. Gradients as in test_logprobs: 3% of the largest entry.
    assert_close(loss, e_loss, atol=2e-2, rtol=2e-2, name="loss")
    assert dh.dtype == dw.dtype == torch.bfloat16
    assert_close(dh, e_dh, atol=0.03 * e_dh.abs().max().item(), rtol=0.03, name="d_hidden")
    assert_close(dw, e_dw, atol=0.03 * e_dw.abs().max().item(), rtol=0.03, name="d_weight")


# ---------------------------------------------------------------- gradient accumulation
def _microbatch_split(cu, parts):
    """Split sequences into `parts` contiguous groups -> list of (token slice, local cu_seqlens)."""
    groups = torch.tensor_split(torch.arange(len(cu) - 1), parts)
    out = []
    for seqs in groups:
        start, stop = int(cu[seqs[0]]), int(cu[seqs[-1] + 1])
        out.append((slice(start, stop), cu[seqs[0]: seqs[-1] + 2] - start))
    return out


def _global_normalizer(aggregation, mask, cu):
    if aggregation == "token-mean":
        return mask.sum().float()
    if aggregation == "seq-mean-token-sum-norm":
        return 24.0  # the Dr. GRPO constant must be the same on every micro-batch
    return sum(bool(mask[cu[i]: cu[i + 1]].any()) for i in range(len(cu) - 1))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_four_microbatches_add_up_to_the_big_batch(aggregation, ratio_level):
    cu = torch.tensor([0, 5, 12, 13, 20, 31, 31, 40, 47])  # 8 sequences, one empty
    logp, old, ref, adv, mask = _token_inputs(47)
    cfg = PolicyLossConfig(ratio_level=ratio_level, kl_type="k3", kl_coef=0.1, aggregation=aggregation)
    norm = _global_normalizer(aggregation, mask, cu)
    full_logp = logp.clone().requires_grad_()
    full, _ = policy_loss(full_logp, old, adv, mask, cu, cfg, ref_logprobs=ref, normalizer=norm, impl="torch")
    full.backward()
    if aggregation != "seq-mean-token-sum-norm":  # with the default normaliser too: same big-batch loss
        assert_close(full, policy_loss(logp, old, adv, mask, cu, cfg, ref_logprobs=ref)[0], **FP32, name="default")
    micro_logp = logp.clone().requires_grad_()
    total = 0
    for tokens, local_cu in _microbatch_split(cu, 4):
        loss, _ = policy_loss(micro_logp[tokens], old[tokens], adv[tokens], mask[tokens], local_cu, cfg,
                              ref_logprobs=ref[tokens], normalizer=norm, impl="torch")
        loss.backward()
        total = total + loss.detach()
    assert_close(total, full, **FP32, name="sum of micro-batch losses")
    assert_close(micro_logp.grad, full_logp.grad, **FP32, name="accumulated d_logprobs")


def test_fused_four_microbatches_add_up_to_the_big_batch():
    T, V, H, _ = FUSED_SHAPES[1]
    cu = torch.tensor([0, 5, 12, 13, 20, 31, 31, 40, 47])
    hidden, weight, labels, old, ref, adv, mask = _head_inputs(T, V, H, torch.float32)
    cfg = PolicyLossConfig(kl_type="k3", kl_coef=0.1, aggregation="seq-mean-token-mean")
    norm = _global_normalizer(cfg.aggregation, mask, cu)
    w_full, w_micro = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    full, _ = fused_linear_policy_loss(hidden, w_full, labels, old, adv, mask, cu, cfg, ref_logprobs=ref,
                                       normalizer=norm, impl="torch")
    full.backward()
    total = 0
    for tokens, local_cu in _microbatch_split(cu, 4):
        loss, _ = fused_linear_policy_loss(hidden[tokens], w_micro, labels[tokens], old[tokens], adv[tokens],
                                           mask[tokens], local_cu, cfg, ref_logprobs=ref[tokens], normalizer=norm,
                                           impl="torch")
        loss.backward()
        total = total + loss.detach()
    assert_close(total, full, **FP32, name="sum of micro-batch losses")
    assert_close(w_micro.grad, w_full.grad, **FP32, name="accumulated d_weight")


# --------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad,field", [(dict(eps_low=1.5), "eps_low"), (dict(kl_type="k4"), "kl_type"),
                                       (dict(aggregation="mean"), "aggregation"),
                                       (dict(ratio_level="sequence", clip_ratio_c=3.0), "clip_ratio_c")])
def test_config_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**bad)


def test_kl_without_reference_logprobs_is_an_error():
    logp, old, _, adv, mask = _token_inputs(47)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, old, adv, mask, CU_SEQLENS, PolicyLossConfig(kl_type="k3", kl_coef=0.1))
