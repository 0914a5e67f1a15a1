"""Policy losses: closed forms on hand-made tokens, where gradients flow, equivalence with the
kernel's reference, and micro-batch aggregation."""
import math

import pytest
import torch

from kernels.reference import policy_loss_ref
from megatron_vlm.rl.losses import (POLICY_LOSSES, LossConfig, LossInputs, get_policy_loss, kernel_policy_config,
                                    policy_loss_fn, register_policy_loss)
from tests.utils import assert_close

FP32 = dict(atol=1e-6, rtol=1e-6)  # a handful of fp32 operations on O(1) values


def _inputs(log_ratio, adv, cu, logp=None, mask=None, ref=None, normalizer=None):
    log_ratio = torch.tensor(log_ratio, dtype=torch.float32)
    logp = torch.tensor(logp, dtype=torch.float32) if logp is not None else torch.full_like(log_ratio, -1.0)
    logp.requires_grad_()
    old = (logp.detach() - log_ratio).requires_grad_()  # requires grad: the test checks none arrives
    adv = torch.tensor(adv, dtype=torch.float32).requires_grad_()
    mask = torch.tensor(mask, dtype=torch.float32) if mask is not None else torch.ones_like(log_ratio)
    ref = torch.tensor(ref, dtype=torch.float32) if ref is not None else None
    return LossInputs(logp, old, adv, mask, torch.tensor(cu), ref_logprobs=ref, normalizer=normalizer)


def _loss_and_grad(inputs, cfg):
    loss, metrics = policy_loss_fn(inputs, cfg)
    loss.backward()
    assert inputs.old_logprobs.grad is None and inputs.advantages.grad is None
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    return loss, inputs.logprobs.grad, metrics


# Three tokens of one sequence: ratio 1.25 with A = +1, ratio 1 with A = -1, ratio 0.5 with A = -1.
RATIOS = [math.log(1.25), 0.0, math.log(0.5)]
ADVS = [1.0, -1.0, -1.0]


def test_ppo_closed_form_and_clipped_tokens_get_no_gradient():
    loss, grad, m = _loss_and_grad(_inputs(RATIOS, ADVS, [0, 3]), LossConfig(name="ppo"))
    # token 0: clipped at 1.2 -> -1.2; token 1: +1; token 2: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 1 + 0.8) / 3)
    assert_close(grad, torch.tensor([0.0, 1 / 3, 0.0]), **FP32, name="d logp")
    assert m["clipfrac_high"].item() == pytest.approx(1 / 3) and m["clipfrac_low"].item() == pytest.approx(1 / 3)


def test_dapo_clip_higher_lets_the_positive_token_grow():
    loss, grad, _ = _loss_and_grad(_inputs(RATIOS, ADVS, [0, 3]), LossConfig(name="dapo"))
    # eps_high 0.28: ratio 1.25 is inside [0.8, 1.28] -> -1.25 with d/dlogp = -A r / 3
    assert loss.item() == pytest.approx((-1.25 + 1 + 0.8) / 3)
    assert_close(grad, torch.tensor([-1.25 / 3, 1 / 3, 0.0]), **FP32, name="d logp")


def test_dual_clip_bounds_negative_advantage_tokens():
    inputs = _inputs([math.log(5.0), math.log(2.0)], [-1.0, -1.0], [0, 2])
    loss, grad, m = _loss_and_grad(inputs, LossConfig(name="dual_clip"))
    # token 0: max(5, 1.2) = 5 > c = 3 -> 3, no gradient; token 1: 2 < 3 -> 2, d/dlogp = r / 2 = 1
    assert loss.item() == pytest.approx((3 + 2) / 2)
    assert_close(grad, torch.tensor([0.0, 1.0]), **FP32, name="d logp")
    assert m["clipfrac_dual"].item() == pytest.approx(0.5)


def test_gspo_sequence_ratio_closed_form():
    # sequence 0: log-ratios 0.1 and -0.1 -> s = 1, A = 2; sequence 1: log-ratios 0.5 x 3 -> s = e^0.5, clipped
    inputs = _inputs([0.1, -0.1, 0.5, 0.5, 0.5], [2.0, 2.0, 1.0, 1.0, 1.0], [0, 2, 5])
    loss, grad, _ = _loss_and_grad(inputs, LossConfig(name="gspo"))
    assert loss.item() == pytest.approx((-2 * 1 + -1 * (1 + 4e-4)) / 2)  # per-sample mean
    # d/dlogp_t = -A s / n_i / (number of sequences); the clipped sequence gets nothing
    assert_close(grad, torch.tensor([-0.5, -0.5, 0, 0, 0]), **FP32, name="d logp")


def test_intern_s1_nll_on_positive_pg_on_negative():
    # sequence 0 (A = +1): log-probs -1, -2 -> NLL 3; sequence 1 (A = -1): ratio 1 -> +1 per token;
    # sequence 2 (A = 0): nothing
    inputs = _inputs([0.3, -0.2, 0.0, 0.0, 0.0], [1.0, 1.0, -1.0, -1.0, 0.0], [0, 2, 4, 5],
                     logp=[-1.0, -2.0, -1.0, -3.0, -0.5])
    loss, grad, m = _loss_and_grad(inputs, LossConfig(name="intern_s1"))
    assert loss.item() == pytest.approx((3 + 2) / 5)
    # NLL: -1 / 5 per positive token whatever its ratio (no clipping); PG: -A r / 5 = 1 / 5
    assert_close(grad, torch.tensor([-0.2, -0.2, 0.2, 0.2, 0.0]), **FP32, name="d logp")
    assert m["nll_loss"].item() == pytest.approx(3 / 5) and m["pg_loss"].item() == pytest.approx(2 / 5)
    assert m["positive_token_frac"].item() == pytest.approx(2 / 5)
    loss2, _, _ = _loss_and_grad(_inputs([0.3, -0.2, 0.0, 0.0, 0.0], [1.0, 1.0, -1.0, -1.0, 0.0], [0, 2, 4, 5],
                                         logp=[-1.0, -2.0, -1.0, -3.0, -0.5]),
                                 LossConfig(name="intern_s1", nll_coef=0.5))
    assert loss2.item() == pytest.approx((1.5 + 2) / 5)
    with pytest.raises(ValueError, match="intern_s1 has no eps-clip"):
        policy_loss_fn(inputs, LossConfig(name="intern_s1", eps_high=0.28))


def test_intern_s1_dual_clip_bounds_the_negative_term():
    # A = -1 on both tokens: ratio 5 > c = 3 -> term -A min(5, 3) = 3, no gradient; ratio 2 -> 2, d = r / 2 = 1
    inputs = lambda: _inputs([math.log(5.0), math.log(2.0)], [-1.0, -1.0], [0, 2])  # noqa: E731
    loss, grad, m = _loss_and_grad(inputs(), LossConfig(name="intern_s1"))
    assert loss.item() == pytest.approx((3 + 2) / 2)
    assert_close(grad, torch.tensor([0.0, 1.0]), **FP32, name="d logp")
    assert m["clipfrac_dual"].item() == pytest.approx(0.5)
    # c = 4.5: bound 4.5 on the first token; c = inf: the unbounded form -A r (5 + 2) / 2, d = r / 2
    assert _loss_and_grad(inputs(), LossConfig(name="intern_s1", clip_ratio_c=4.5))[0].item() == pytest.approx(3.25)
    loss, grad, _ = _loss_and_grad(inputs(), LossConfig(name="intern_s1", clip_ratio_c=float("inf")))
    assert loss.item() == pytest.approx(3.5)
    assert_close(grad, torch.tensor([2.5, 1.0]), **FP32, name="d logp, unbounded")


def test_intern_s1_is_weight_scales_both_policy_terms_not_kl():
    # token 0 (A = +1, NLL 1), token 1 (A = -1, ratio 1, term 1); weights 0.5 and 0; KL k1 = 0.5 on both
    inputs = _inputs([0.0, 0.0], [1.0, -1.0], [0, 2], logp=[-1.0, -1.0], ref=[-1.5, -1.5])
    inputs.is_weight = torch.tensor([0.5, 0.0])
    loss, grad, m = _loss_and_grad(inputs, LossConfig(name="intern_s1", kl_type="k1", kl_coef=0.1))
    assert loss.item() == pytest.approx((0.5 * 1 + 0 * 1) / 2 + 0.1 * 0.5)
    assert m["kl_loss"].item() == pytest.approx(0.5)
    assert_close(grad, torch.tensor([-0.5 / 2 + 0.1 / 2, 0.1 / 2]), **FP32, name="d logp")


def test_cispo_gradient_is_the_clipped_weight_times_advantage():
    # ratios 1.5 (A = +1), 0.5 (A = -1), 1.1 (A = +2); eps_high 0.28 -> weights 1.28, 0.5 (no floor), 1.1
    inputs = _inputs([math.log(1.5), math.log(0.5), math.log(1.1)], [1.0, -1.0, 2.0], [0, 3],
                     logp=[-1.0, -2.0, -0.5])
    loss, grad, m = _loss_and_grad(inputs, LossConfig(name="cispo"))
    w, adv, logp = torch.tensor([1.28, 0.5, 1.1]), torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-1.0, -2.0, -0.5])
    assert loss.item() == pytest.approx(float((-w * adv * logp).sum() / 3))
    # every token keeps a gradient, clipped or not (PPO would give the first token none)
    assert_close(grad, -w * adv / 3, **FP32, name="d logp")
    assert m["clipfrac_high"].item() == pytest.approx(1 / 3) and m["clipfrac_low"].item() == 0
    # eps_low 0.2 floors the second weight at 0.8; a rollout-correction weight multiplies the PG term
    inputs = _inputs([math.log(1.5), math.log(0.5), math.log(1.1)], [1.0, -1.0, 2.0], [0, 3],
                     logp=[-1.0, -2.0, -0.5])
    inputs.is_weight = torch.tensor([2.0, 1.0, 0.0])
    _, grad, m = _loss_and_grad(inputs, LossConfig(name="cispo", eps_low=0.2))
    assert_close(grad, -torch.tensor([1.28 * 2, 0.8, 0.0]) * adv / 3, **FP32, name="d logp, eps_low + is_weight")
    assert m["clipfrac_low"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["ppo", "dapo", "dual_clip", "gspo", "cispo", "intern_s1"])
def test_is_weight_one_changes_nothing_and_zero_removes_the_pg_gradient(name):
    logp, old, _, adv, mask = _random_inputs()
    ones, zeros = torch.ones_like(logp), torch.zeros_like(logp)
    grads = []
    for w in (None, ones, zeros):
        lp = logp.clone().requires_grad_()
        loss, _ = policy_loss_fn(LossInputs(lp, old, adv, mask, CU, is_weight=w), LossConfig(name=name))
        loss.backward()
        grads.append(lp.grad)
    assert_close(grads[1], grads[0], atol=0, rtol=0, name="w = 1")
    assert (grads[2] == 0).all() and grads[0].abs().max() > 0


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("name", ["dapo", "intern_s1"])
def test_kl_penalty_closed_form(kl_type, name):
    # on-policy (ratio 1), advantage 0: the loss is kl_coef * mean KL; d = logp - ref = 0.5
    inputs = _inputs([0.0, 0.0], [0.0, 0.0], [0, 2], logp=[-1.0, -1.0], ref=[-1.5, -1.5])
    loss, grad, m = _loss_and_grad(inputs, LossConfig(name=name, kl_type=kl_type, kl_coef=0.1))
    d = 0.5
    kl, dkl = {"k1": (d, 1.0), "k2": (d * d / 2, d), "k3": (math.exp(-d) + d - 1, 1 - math.exp(-d))}[kl_type]
    assert m["kl_loss"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)
    assert_close(grad, torch.full((2,), 0.1 * dkl / 2), **FP32, name="d logp")


def test_no_kl_by_default():
    _, _, m = _loss_and_grad(_inputs(RATIOS, ADVS, [0, 3]), LossConfig())
    assert "kl_loss" not in m
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss_fn(_inputs(RATIOS, ADVS, [0, 3]), LossConfig(kl_type="k3", kl_coef=0.1))


def _random_inputs(T=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(T, generator=g) * 3
    old = logp + 0.3 * torch.randn(T, generator=g)
    ref = logp + 0.3 * torch.randn(T, generator=g)
    adv = torch.randn(T, generator=g)
    mask = (torch.rand(T, generator=g) > 0.2).float()
    return logp, old, ref, adv, mask


CU = torch.tensor([0, 5, 6, 14, 23])


@pytest.mark.parametrize("name,aggregation,impl", [
    (name, aggregation, "auto") for name in ("ppo", "dapo", "dual_clip", "gspo")
    for aggregation in (None, "seq-mean-token-mean", "token-mean")]
    + [("dapo", None, "triton"), ("gspo", None, "triton")])
def test_kernel_losses_equal_the_kernel_reference(name, aggregation, impl):
    """Also through the Triton kernel (interpreted on CPU): LossConfig.impl reaches the kernel."""
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"  # interpreter only on CPU
    logp, old, ref, adv, mask = (t.to(device) for t in _random_inputs())
    cfg = LossConfig(name=name, aggregation=aggregation, kl_type="k3", kl_coef=0.05, impl=impl)
    ours = logp.clone().requires_grad_()
    loss, metrics = policy_loss_fn(LossInputs(ours, old, adv, mask, CU.to(device), ref_logprobs=ref), cfg)
    loss.backward()
    theirs = logp.clone().requires_grad_()
    expected, expected_metrics = policy_loss_ref(theirs, old, adv, mask, CU.to(device), kernel_policy_config(cfg),
                                                 ref_logprobs=ref)
    expected.backward()
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5, name="d logp")
    assert set(metrics) == set(expected_metrics)


def test_paper_defaults_resolve_into_the_kernel_config():
    assert vars(kernel_policy_config(LossConfig(name="ppo", eps_low=0.1))) == vars(kernel_policy_config(
        LossConfig(name="ppo", eps_low=0.1, eps_high=0.1)))
    dapo = kernel_policy_config(LossConfig(name="dapo"))
    assert (dapo.eps_low, dapo.eps_high, dapo.aggregation) == (0.2, 0.28, "token-mean")
    gspo = kernel_policy_config(LossConfig(name="gspo"))
    assert (gspo.ratio_level, gspo.eps_low, gspo.eps_high, gspo.aggregation) == (
        "sequence", 3e-4, 4e-4, "seq-mean-token-mean")
    assert kernel_policy_config(LossConfig(name="dual_clip")).clip_ratio_c == 3.0
    assert kernel_policy_config(LossConfig(name="intern_s1")) is None


@pytest.mark.parametrize("name", ["dapo", "gspo", "intern_s1", "cispo"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_full_batch(name, aggregation):
    logp, old, ref, adv, mask = _random_inputs()
    cfg = LossConfig(name=name, aggregation=aggregation, kl_type="k1", kl_coef=0.1)
    if aggregation == "token-mean":
        normalizer = mask.sum()
    elif aggregation == "seq-mean-token-mean":
        normalizer = torch.tensor(4.0)  # all four sequences have unmasked tokens
        assert all(mask[s:e].sum() > 0 for s, e in zip(CU[:-1].tolist(), CU[1:].tolist()))
    else:
        normalizer = 16.0  # the Dr. GRPO constant
    full_logp = logp.clone().requires_grad_()
    full, _ = policy_loss_fn(LossInputs(full_logp, old, adv, mask, CU, ref_logprobs=ref, normalizer=normalizer), cfg)
    full.backward()
    total, grads = 0.0, []
    for lo, hi in ((0, 2), (2, 4)):  # sequences [0, 2) and [2, 4)
        s, e = int(CU[lo]), int(CU[hi])
        part = logp[s:e].clone().requires_grad_()
        loss, _ = policy_loss_fn(LossInputs(part, old[s:e], adv[s:e], mask[s:e], CU[lo:hi + 1] - s,
                                            ref_logprobs=ref[s:e], normalizer=normalizer), cfg)
        loss.backward()
        total, grads = total + loss, grads + [part.grad]
    assert_close(total, full, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(torch.cat(grads), full_logp.grad, atol=1e-6, rtol=1e-5, name="d logp")
    if aggregation == "token-mean":  # without the normaliser the two halves are not the full loss
        parts = [policy_loss_fn(LossInputs(logp[s:e], old[s:e], adv[s:e], mask[s:e], CU[lo:hi + 1] - s,
                                           ref_logprobs=ref[s:e]), cfg)[0]
                 for lo, hi in ((0, 2), (2, 4)) for s, e in [(int(CU[lo]), int(CU[hi]))]]
        assert abs((parts[0] + parts[1]).item() - full.item()) > 1e-3


def test_per_sample_versus_per_token_aggregation():
    # two sequences of 1 and 3 tokens, pg = +1 on the first and -1 on the others (ratio 1)
    inputs = lambda: _inputs([0.0] * 4, [-1.0, 1.0, 1.0, 1.0], [0, 1, 4])  # noqa: E731
    token, _, _ = _loss_and_grad(inputs(), LossConfig(name="dapo", aggregation="token-mean"))
    sample, _, _ = _loss_and_grad(inputs(), LossConfig(name="dapo", aggregation="seq-mean-token-mean"))
    assert token.item() == pytest.approx((1 - 3) / 4)
    assert sample.item() == pytest.approx((1 + -1) / 2, abs=1e-6)


def test_registry_and_config_contract():
    assert {"ppo", "dapo", "dual_clip", "gspo", "intern_s1", "cispo"} <= set(POLICY_LOSSES.names())
    with pytest.raises(ValueError, match="'gspo' is already registered"):
        register_policy_loss("gspo")(lambda inputs, cfg: None)
    with pytest.raises(KeyError, match="known: cispo, dapo, dual_clip, gspo"):
        get_policy_loss("trpo")
    with pytest.raises(ValueError, match="loss.name must be one of .* got 'trpo'"):
        LossConfig(name="trpo")
    with pytest.raises(ValueError, match="loss.aggregation must be one of .* got 'mean'"):
        LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="loss.eps_low must be in \\(0, 1\\), got 1.5"):
        LossConfig(eps_low=1.5)
    with pytest.raises(ValueError, match="loss.kl_type must be one of .* got 'k4'"):
        LossConfig(kl_type="k4")
    with pytest.raises(ValueError, match=r"LossInputs.mask must be \[T\] = \[3\]"):
        LossInputs(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(2), torch.tensor([0, 3]))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                         "seq-mean-token-sum-norm"])
def test_intern_s1_aggregates_like_the_kernel_reference(aggregation):
    """The vectorised aggregation weights it borrows from kernels.policy_loss give aggregate_ref's value."""
    from kernels.reference import aggregate_ref, kl_penalty_ref

    logp, old, ref, adv, mask = _random_inputs(seed=3)
    mask[5] = 0  # sequence 1 (one token) empty
    cfg = LossConfig(name="intern_s1", aggregation=aggregation, kl_type="k2", kl_coef=0.3, nll_coef=0.7)
    loss, _ = policy_loss_fn(LossInputs(logp.clone().requires_grad_(), old, adv, mask, CU, ref_logprobs=ref), cfg)
    per_token = (0.7 * (adv > 0) * -logp + (adv < 0) * -adv * (logp - old).exp().clamp(max=3.0)
                 + 0.3 * kl_penalty_ref(logp, ref, "k2"))
    assert_close(loss, aggregate_ref(per_token, mask, CU, aggregation), atol=1e-6, rtol=1e-5, name="loss")


def test_fused_head_path_gives_the_same_loss_with_kernel_policy_config():
    """The trainer's fused LM-head route: kernel_policy_config(cfg) into fused_linear_policy_loss."""
    from kernels.policy_loss import fused_linear_policy_loss
    from kernels.reference import linear_logprobs_ref

    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(23, 16, generator=g), torch.randn(37, 16, generator=g) * 0.3
    labels = torch.randint(0, 37, (23,), generator=g)
    _, old, ref, adv, mask = _random_inputs()
    logp, _ = linear_logprobs_ref(hidden, weight, labels)
    old = logp + 0.2 * torch.randn(23, generator=g)
    for name in ("dapo", "gspo"):
        cfg = LossConfig(name=name, kl_type="k3", kl_coef=0.1)
        expected, _ = policy_loss_fn(LossInputs(logp, old, adv, mask, CU, ref_logprobs=ref), cfg)
        fused, _ = fused_linear_policy_loss(hidden, weight, labels, old, adv, mask, CU, kernel_policy_config(cfg),
                                            ref_logprobs=ref)
        assert_close(fused, expected, atol=1e-5, rtol=1e-5, name=f"{name} loss")


def test_padded_batch_through_flatten_padded_equals_packed():
    from megatron_vlm.rl.tokens import flatten_padded

    logp, old, _, adv, _ = _random_inputs(T=8)
    lengths = [3, 5]
    padded_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1.0]])

    def pad(x):
        out = torch.zeros(2, 5)
        out[0, :3], out[1] = x[:3], x[3:]
        return out
    cfg = LossConfig(name="dapo", aggregation="seq-mean-token-mean")
    flat = [flatten_padded(pad(x), padded_mask)[0] for x in (logp, old, adv)]
    _, mask, cu = flatten_padded(pad(logp), padded_mask)
    padded_loss, _ = policy_loss_fn(LossInputs(*flat, mask, cu), cfg)
    packed_loss, _ = policy_loss_fn(LossInputs(logp, old, adv, torch.ones(8), torch.tensor([0, *lengths]).cumsum(0)),
                                    cfg)
    assert_close(padded_loss, packed_loss, atol=1e-6, rtol=1e-6, name="loss")
