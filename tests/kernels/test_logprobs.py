"""linear_logprobs (torch and Triton paths) against kernels.reference.linear_logprobs_ref."""
import pytest
import torch

from kernels.logprobs import linear_logprobs
from kernels.reference import linear_logprobs_ref
from tests.utils import assert_close

SHAPES = [(64, 512, 64), (47, 1237, 96)]  # (T, V, H): one regular, one awkward (nothing divides a tile)
IMPLS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on CPU (see tests/conftest.py)


def _inputs(T, V, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)  # logits of O(5): a peaked softmax
    labels = torch.randint(0, V, (T,), generator=g)
    grad_logp, grad_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return hidden, weight, labels, grad_logp, grad_ent


def _run(fn, hidden, weight, labels, temperature, grad_logp, grad_ent):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    logp, ent = fn(hidden, weight, labels, temperature)
    (logp * grad_logp + ent * grad_ent).sum().backward()
    return logp.detach(), ent.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,V,H", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_reference(impl, T, V, H, temperature):
    hidden, weight, labels, g_logp, g_ent = _inputs(T, V, H, torch.float32)
    ours = _run(lambda *a: linear_logprobs(*a, impl=impl), hidden, weight, labels, temperature, g_logp, g_ent)
    ref = _run(linear_logprobs_ref, hidden, weight, labels, temperature, g_logp, g_ent)
    # fp32, same math, different summation order (vocab tiles / token blocks vs one GEMM and one
    # log_softmax): observed <= 2e-5 absolute on values of O(10); 1e-4 leaves a margin.
    for name, a, b in zip(["logprobs", "entropy", "d_hidden", "d_weight"], ours, ref):
        assert_close(a, b, atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,V,H", SHAPES)
def test_bf16_against_fp32_reference(impl, T, V, H):
    hidden, weight, labels, g_logp, g_ent = _inputs(T, V, H, torch.bfloat16)
    ours = _run(lambda *a: linear_logprobs(*a, impl=impl), hidden, weight, labels, 1.0, g_logp, g_ent)
    # The reference sees the same bf16 values upcast, so only the arithmetic's precision differs.
    ref = _run(linear_logprobs_ref, hidden.float(), weight.float(), labels, 1.0, g_logp, g_ent)
    # torch path: the bf16 GEMM rounds logits (|z| <= ~20) to 8 mantissa bits, ~0.04 worst case per
    # logit, and log-prob / entropy inherit it; Triton keeps the fp32 accumulator (observed 1e-6).
    for name, a, b in zip(["logprobs", "entropy"], ours[:2], ref[:2]):
        assert_close(a, b, atol=0.1, rtol=1e-2, name=name)
    # Gradients: d logits is rounded to bf16 before both gradient GEMMs and the results to bf16:
    # observed <= 0.9% of the gradient's largest entry; 3% of it as tolerance.
    for name, a, b in zip(["d_hidden", "d_weight"], ours[2:], ref[2:]):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, atol=0.03 * b.abs().max().item(), rtol=0.03, name=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_never_positive_even_when_one_logit_dominates(impl):
    hidden, weight, labels, _, _ = _inputs(47, 1237, 96, torch.float32)
    weight = weight * 200  # logits of O(1e3): exp underflows for all but the max
    labels = (hidden @ weight.t()).argmax(-1)  # the target is the max logit: logp -> 0 from below
    logp, ent = linear_logprobs(hidden, weight, labels, impl=impl)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp <= 0).all(), logp.max()
    assert (ent >= -1e-5).all()


def test_forward_only_under_no_grad_keeps_nothing():
    hidden, weight, labels, _, _ = _inputs(47, 1237, 96, torch.float32)
    with torch.no_grad():
        logp, _ = linear_logprobs(hidden.requires_grad_(), weight, labels, impl="torch")
    assert logp.grad_fn is None


def test_triton_partials_ignore_labels_owned_by_another_vocab_shard():
    # Labels past this shard's V (here 619, padded to 640 by the vocab tiles) belong to another TP
    # rank: this rank's target-logit partial must be 0, not the padded column's -inf.
    from kernels.logprobs import logprobs_fwd_triton
    hidden, weight, _, _, _ = _inputs(16, 619, 32, torch.float32)
    labels = torch.arange(619, 635)
    *_, target = logprobs_fwd_triton(hidden, weight, labels, 1.0, vocab_start=0, need_entropy=False)
    assert torch.equal(target, torch.zeros_like(target))


@pytest.mark.parametrize("impl", IMPLS)
def test_without_entropy_the_logprob_gradient_is_unchanged(impl):
    hidden, weight, labels, g_logp, _ = _inputs(47, 1237, 96, torch.float32)
    no_entropy = torch.zeros(47)

    def logprobs_only(h, w, y, t):
        return linear_logprobs(h, w, y, t, with_entropy=False, impl=impl)[0], no_entropy

    logp, _, dh, dw = _run(logprobs_only, hidden, weight, labels, 1.0, g_logp, no_entropy)
    logp_ref, _, dh_ref, dw_ref = _run(linear_logprobs_ref, hidden, weight, labels, 1.0, g_logp, no_entropy)
    for name, a, b in [("logprobs", logp, logp_ref), ("d_hidden", dh, dh_ref), ("d_weight", dw, dw_ref)]:
        assert_close(a, b, atol=1e-4, rtol=1e-5, name=name)  # as in test_fp32_matches_reference
