"""The Triton head's pieces against kernels.reference: the d logits kernel (per vocab shard), the
chunked backward (several chunks, fp32 d weight accumulation), the split forward, autotuning and
the dot precision. Under TRITON_INTERPRET=1 on CPU; on a CUDA machine the same tests run on it."""
import pytest
import torch

import kernels.logprobs as lp
from kernels.interpret import interpreting
from kernels.reference import linear_logprobs_ref
from tests.utils import assert_close

DEVICE = "cpu" if interpreting() else "cuda"
SHAPES = [(64, 512, 64), (47, 1237, 96)]  # (T, V, H): one regular, one awkward (nothing divides a tile)
FP32 = dict(atol=1e-4, rtol=1e-5)  # fp32, another summation order: as in test_logprobs


def _inputs(T, V, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)  # logits of O(5): a peaked softmax
    labels = torch.randint(0, V, (T,), generator=g)
    g_logp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return [t.to(DEVICE) for t in (hidden, weight, labels, g_logp, g_ent)]


def _reference_dlogits(hidden, weight, labels, temperature, g_logp, g_ent):
    """(d loss / d (hidden @ weight^T), lse, entropy) with full fp32 logits and autograd."""
    z = (hidden.float() @ weight.float().t()).requires_grad_()
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    logp = logp_all.gather(1, labels.unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(1)
    loss = (logp * g_logp).sum() + ((entropy * g_ent).sum() if g_ent is not None else 0)
    (dz,) = torch.autograd.grad(loss, z)
    return dz, torch.logsumexp(z.detach() / temperature, 1), entropy.detach()


@pytest.mark.parametrize("T,V,H", SHAPES)
@pytest.mark.parametrize("with_entropy", [True, False])
def test_dlogits_kernel_matches_autograd_on_each_vocab_shard(T, V, H, with_entropy):
    hidden, weight, labels, g_logp, g_ent = _inputs(T, V, H, torch.float32)
    g_ent = g_ent if with_entropy else None
    expected, lse, entropy = _reference_dlogits(hidden, weight, labels, 0.7, g_logp, g_ent)
    shard = V // 2  # rank 1 of TP=2: its labels are a mix of owned and foreign
    for vocab_start, rows in [(0, slice(0, shard)), (shard, slice(shard, V))]:
        w = weight[rows].contiguous()
        out = torch.empty(T, w.shape[0], device=DEVICE)
        lp.dlogits_triton(hidden, w, labels, 0.7, vocab_start, lse, entropy, g_logp, g_ent, out)
        assert_close(out, expected[:, rows], atol=1e-5, rtol=1e-4, name=f"d logits [{vocab_start}:]")


@pytest.mark.parametrize("T,V,H", SHAPES)
def test_dlogits_kernel_bf16_against_fp32_reference(T, V, H):
    hidden, weight, labels, g_logp, g_ent = _inputs(T, V, H, torch.bfloat16)
    expected, lse, entropy = _reference_dlogits(hidden, weight, labels, 1.0, g_logp, g_ent)
    out = torch.empty(T, V, dtype=torch.bfloat16, device=DEVICE)
    lp.dlogits_triton(hidden, weight, labels, 1.0, 0, lse, entropy, g_logp, g_ent, out)
    # The logits are the same fp32 accumulation of exact bf16 products; only the stored d logits is
    # rounded to bf16 (8 bits: 0.4% of each entry) -> 1% relative, plus 1e-3 of the largest entry.
    assert_close(out.float(), expected, atol=1e-3 * expected.abs().max().item(), rtol=1e-2, name="d logits bf16")


def _run_head(hidden, weight, labels, g_logp, g_ent, temperature=0.9, impl="triton"):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if impl == "ref":
        logp, ent = linear_logprobs_ref(hidden, weight, labels, temperature)
    else:
        logp, ent = lp.linear_logprobs(hidden, weight, labels, temperature, impl=impl)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("T,V,H", SHAPES)
def test_several_backward_chunks_and_forward_splits_match_the_reference_fp32(T, V, H, monkeypatch):
    # chunks of 16 rows (47 = 16 + 16 + 15: a short last chunk), splits of 256 columns (V=1237: 5,
    # the last one partly past V): the paths production takes at T > T_chunk and V/tp > 2048.
    monkeypatch.setattr(lp, "dlogits_chunk_rows", lambda vocab, dtype: 16)
    monkeypatch.setattr(lp, "SPLIT_COLUMNS", 256)
    hidden, weight, labels, g_logp, g_ent = _inputs(T, V, H, torch.float32)
    ours = _run_head(hidden, weight, labels, g_logp, g_ent)
    ref = _run_head(hidden, weight, labels, g_logp, g_ent, impl="ref")
    for name, a, b in zip(["logprobs", "entropy", "d_hidden", "d_weight"], ours, ref):
        assert_close(a, b, **FP32, name=name)


def test_several_backward_chunks_bf16_accumulate_d_weight_in_fp32(monkeypatch):
    hidden, weight, labels, g_logp, g_ent = _inputs(47, 1237, 96, torch.bfloat16)
    ref = _run_head(hidden.float(), weight.float(), labels, g_logp, g_ent, impl="ref")
    one_chunk = _run_head(hidden, weight, labels, g_logp, g_ent)
    monkeypatch.setattr(lp, "dlogits_chunk_rows", lambda vocab, dtype: 16)
    chunked = _run_head(hidden, weight, labels, g_logp, g_ent)
    for ours in (one_chunk, chunked):
        # fp32 accumulation of exact bf16 products: log-probs as the fp32 reference (observed 2e-6)
        assert_close(ours[0], ref[0], **FP32, name="logprobs")
        assert_close(ours[1], ref[1], **FP32, name="entropy")
        # d logits and the results are rounded to bf16: observed <= 0.9% of the largest entry (as in
        # test_logprobs); the fp32 accumulator keeps three chunks at one chunk's error.
        for name, a, b in zip(["d_hidden", "d_weight"], ours[2:], ref[2:]):
            assert a.dtype == torch.bfloat16
            assert_close(a.float(), b, atol=0.03 * b.abs().max().item(), rtol=0.03, name=name)
    # a chunk boundary changes only which GEMM call a row's d logits enters: d hidden agrees to a bf16 ulp
    assert_close(one_chunk[2].float(), chunked[2].float(), atol=1e-6, rtol=1e-2, name="d_hidden chunked vs not")


def test_triton_bf16_forward_keeps_fp32_accuracy():
    # What the bf16 tensor-core branch buys over the torch path's bf16 GEMM (whose rounded logits move
    # log-probs by up to ~0.04): products of bf16 values are exact in fp32, so the fp32-accumulated
    # dot and log-sum-exp give the fp32 answer for the same (bf16) inputs.
    hidden, weight, labels, _, _ = _inputs(47, 1237, 96, torch.bfloat16)
    logp, ent = lp.linear_logprobs(hidden, weight, labels, impl="triton")
    logp_ref, ent_ref = linear_logprobs_ref(hidden.float(), weight.float(), labels)
    assert_close(logp, logp_ref, **FP32, name="logprobs")
    assert_close(ent, ent_ref, **FP32, name="entropy")


def test_chunk_rows_bound_the_dlogits_block():
    for vocab in (32768, 151936, 75968):
        for dtype in (torch.bfloat16, torch.float32):
            rows = lp.dlogits_chunk_rows(vocab, dtype)
            assert rows % lp.CHUNK_ROW_MULTIPLE == 0
            assert rows * vocab * torch.finfo(dtype).bits // 8 <= lp.DLOGITS_CHUNK_BYTES
            assert (rows + lp.CHUNK_ROW_MULTIPLE) * vocab * torch.finfo(dtype).bits // 8 > lp.DLOGITS_CHUNK_BYTES
    assert lp.dlogits_chunk_rows(10**9, torch.float32) == lp.CHUNK_ROW_MULTIPLE  # never zero rows


def test_autotune_configs_and_the_reported_choice():
    for config in lp.GPU_CONFIGS + lp.INTERPRET_CONFIGS:
        blocks = config.kwargs
        assert lp.SPLIT_COLUMNS % blocks["BLOCK_V"] == 0  # the partials' shape is config-independent
        assert all(b >= 16 and b & (b - 1) == 0 for b in blocks.values())  # tl.dot: powers of 2, >= 16
    if interpreting():
        assert lp.HEAD_CONFIGS == lp.INTERPRET_CONFIGS and len(lp.HEAD_CONFIGS) == 1  # nothing to benchmark
    hidden, weight, labels, g_logp, g_ent = _inputs(47, 1237, 96, torch.float32)
    _run_head(hidden, weight, labels, g_logp, g_ent)
    chosen = lp.tuned_configs()
    assert set(chosen) == {"_fwd_kernel", "_dlogits_kernel"}
    for config in chosen.values():
        assert {"BLOCK_T", "BLOCK_V", "BLOCK_H", "num_warps", "num_stages"} <= set(config)


def test_split_columns_must_suit_every_config():
    hidden, weight, labels, _, _ = _inputs(8, 300, 32, torch.float32)
    with pytest.raises(ValueError, match="split_columns"):
        lp.logprobs_fwd_triton(hidden, weight, labels, 1.0, 0, False, split_columns=100)


def test_dot_precision_per_dtype_and_the_tf32_option():
    assert lp.dot_precision(torch.bfloat16) == "tf32"  # no effect on 16-bit operands
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert lp.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")  # the process allows TF32 for torch matmuls
        assert lp.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
