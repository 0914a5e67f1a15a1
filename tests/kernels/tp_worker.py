"""One rank of the TP=2 check in test_tensor_parallel.py (run as `python -m tests.kernels.tp_worker`).

Every rank builds the same full inputs, keeps its vocab shard of the weight (and, under sequence
parallelism, its token slice of the hidden states), runs the op over the gloo group and compares
outputs and gradients with the TP=1 reference on the full weight. Exits non-zero on any mismatch.
"""
import os
import sys

import torch
import torch.distributed as dist

import kernels.logprobs as lp
from kernels.logprobs import linear_logprobs
from kernels.policy_loss import PolicyLossConfig, fused_linear_policy_loss
from kernels.reference import linear_logprobs_ref, policy_loss_ref
from tests.utils import assert_close

T, V, H = 48, 1238, 96  # T divisible by TP (sequence parallel), V = TP * 619 (megatron pads the vocab so)
CU_SEQLENS = torch.tensor([0, 7, 8, 30, 48])
TOL = dict(atol=1e-4, rtol=1e-5)  # fp32, sums in another order (as in test_logprobs)


def inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (T,), generator=g)
    grads = torch.randn(2, T, generator=g)
    noise = 0.3 * torch.randn(3, T, generator=g)
    return hidden, weight, labels, grads, noise


def local_leaves(hidden, weight, rank, world, sequence_parallel):
    h = hidden.chunk(world)[rank] if sequence_parallel else hidden
    return h.clone().requires_grad_(), weight.chunk(world)[rank].clone().requires_grad_()


def check_logprobs(impl, sequence_parallel, group, rank, world):
    hidden, weight, labels, (g_logp, g_ent), _ = inputs()
    h, w = local_leaves(hidden, weight, rank, world, sequence_parallel)
    logp, ent = linear_logprobs(h, w, labels, 0.9, tp_group=group, sequence_parallel=sequence_parallel, impl=impl)
    (logp * g_logp + ent * g_ent).sum().backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp_ref, ent_ref = linear_logprobs_ref(h_ref, w_ref, labels, 0.9)
    (logp_ref * g_logp + ent_ref * g_ent).sum().backward()
    expected_dh = h_ref.grad.chunk(world)[rank] if sequence_parallel else h_ref.grad
    assert_close(logp, logp_ref, **TOL, name="logprobs")
    assert_close(ent, ent_ref, **TOL, name="entropy")
    assert_close(h.grad, expected_dh, **TOL, name="d_hidden")
    assert_close(w.grad, w_ref.grad.chunk(world)[rank], **TOL, name="d_weight shard")


def check_logprobs_bf16(group, rank, world):
    """Triton bf16 at TP=2 against the fp32 reference on the same bf16 values: the forward keeps fp32
    accuracy (fp32 accumulation of exact products, fp32 statistics all-reduced); the gradients carry
    bf16 d logits and a bf16 all-reduce of d hidden (3% of the largest entry, as in test_logprobs)."""
    hidden, weight, labels, (g_logp, g_ent), _ = inputs()
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    h, w = local_leaves(hidden, weight, rank, world, False)
    logp, ent = linear_logprobs(h, w, labels, 0.9, tp_group=group, impl="triton")
    (logp * g_logp + ent * g_ent).sum().backward()
    h_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp_ref, ent_ref = linear_logprobs_ref(h_ref, w_ref, labels, 0.9)
    (logp_ref * g_logp + ent_ref * g_ent).sum().backward()
    assert_close(logp, logp_ref, **TOL, name="logprobs bf16")
    assert_close(ent, ent_ref, **TOL, name="entropy bf16")
    for name, grad, ref in [("d_hidden bf16", h.grad, h_ref.grad), ("d_weight shard bf16", w.grad, w_ref.grad.chunk(world)[rank])]:
        assert grad.dtype == torch.bfloat16
        assert_close(grad.float(), ref, atol=0.03 * ref.abs().max().item(), rtol=0.03, name=name)


def check_fused_loss(impl, sequence_parallel, ratio_level, group, rank, world):
    hidden, weight, labels, _, noise = inputs()
    cfg = PolicyLossConfig(ratio_level=ratio_level, kl_type="k3", kl_coef=0.1, aggregation="seq-mean-token-mean")
    with torch.no_grad():
        logp = linear_logprobs_ref(hidden, weight, labels)[0]
    old, ref, adv, mask = logp + noise[0], logp + noise[1], noise[2] / 0.3, noise[0] > -0.3
    h, w = local_leaves(hidden, weight, rank, world, sequence_parallel)
    loss, metrics = fused_linear_policy_loss(h, w, labels, old, adv, mask, CU_SEQLENS, cfg, ref_logprobs=ref,
                                             tp_group=group, sequence_parallel=sequence_parallel,
                                             compute_entropy=True, impl=impl)
    loss.backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp_ref, ent_ref = linear_logprobs_ref(h_ref, w_ref, labels)
    expected, expected_metrics = policy_loss_ref(logp_ref, old, adv, mask, CU_SEQLENS, cfg, ref_logprobs=ref,
                                                 entropy=ent_ref)
    expected.backward()
    expected_dh = h_ref.grad.chunk(world)[rank] if sequence_parallel else h_ref.grad
    assert_close(loss, expected, atol=1e-5, rtol=1e-5, name="loss")
    assert_close(metrics["entropy"], expected_metrics["entropy"], atol=1e-5, rtol=1e-5, name="entropy metric")
    assert_close(h.grad, expected_dh, **TOL, name="d_hidden")
    assert_close(w.grad, w_ref.grad.chunk(world)[rank], **TOL, name="d_weight shard")


class small_tiles:
    """Triton backward chunks of 16 rows and forward splits of 256 columns (619 = 3 splits per rank,
    T=48 = 3 chunks), so TP=2 also covers the multi-chunk and multi-split paths."""

    def __enter__(self):
        self.saved = lp.dlogits_chunk_rows, lp.SPLIT_COLUMNS
        lp.dlogits_chunk_rows, lp.SPLIT_COLUMNS = (lambda vocab, dtype: 16), 256

    def __exit__(self, *exc):
        lp.dlogits_chunk_rows, lp.SPLIT_COLUMNS = self.saved


def with_small_tiles(check):
    def run():
        with small_tiles():
            check()
    return run


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    failures = []
    for impl in ("torch", "triton"):
        for sequence_parallel in (False, True):
            cases = [("logprobs", lambda: check_logprobs(impl, sequence_parallel, group, rank, world))]
            for level in ("token", "sequence"):
                cases.append((f"fused {level}", lambda level=level: check_fused_loss(
                    impl, sequence_parallel, level, group, rank, world)))
            if impl == "triton":
                cases += [(f"{name}, small tiles", with_small_tiles(case)) for name, case in cases]
                if not sequence_parallel:
                    cases.append(("logprobs bf16", lambda: check_logprobs_bf16(group, rank, world)))
            for name, case in cases:
                try:
                    case()
                except AssertionError as e:
                    failures.append(f"rank {rank} {impl} sp={sequence_parallel} {name}: {e}")
    dist.barrier()
    dist.destroy_process_group()
    print("\n".join(failures) or f"rank {rank}: all TP={world} checks equal TP=1")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
