"""LM head + policy loss microbenchmark: one provider, one shape, in this process.

Run by `kernels.bench.__main__` as `python -m kernels.bench.head --provider P ...` (a fresh process
per provider so peak memory is the provider's own) and prints one JSON record on the last line.

Providers (each computes log-probs of the sampled tokens from hidden + weight, then the PPO-clip +
k3 KL loss with token-mean, then backward to hidden and weight):
  naive            full [T, V] fp32 logits, log_softmax, gather, autograd
  reference        kernels.reference: naive plus the entropy (the specification, not a contender)
  chunk_recompute  kernels.logprobs.linear_logprobs (token blocks, logits recomputed in backward)
                   + kernels.policy_loss.policy_loss
  fused_torch      kernels.policy_loss.fused_linear_policy_loss, torch path (gradients in the forward)
  triton           the same op, Triton path (CUDA; interpreted on CPU under TRITON_INTERPRET=1); the
                   record carries the configs autotune chose (`tuned`)
  compiled_chunk   torch.compile'd chunking: per token chunk a compiled logits + log_softmax +
                   gather, under activation checkpointing (one chunk's logits alive; recomputed in
                   backward), then the reference loss
  liger            Liger-Kernel's LigerFusedLinearGRPOLoss (chunked, uncompiled), when installed

Timing: per repetition, a fresh leaf hidden / weight (so gradients are freed between repetitions);
forward = the loss call, backward = loss.backward(); wall (perf_counter) and CPU time of the whole
process (process_time: all threads); the table shows the repetition with the least CPU time (the
machine may be shared), the JSON keeps every repetition. Memory: peak RSS above the RSS after warm-up (Linux VmHWM,
reset through /proc/self/clear_refs), or torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import gc
import json
import time

import torch

PROVIDERS = ("naive", "reference", "chunk_recompute", "fused_torch", "triton", "compiled_chunk", "liger")
COMPILED_CHUNK_ROWS = 1024  # tokens per compiled chunk: one [1024, V] fp32 logits block alive
KL_COEF = 0.04
EPS_LOW, EPS_HIGH = 0.2, 0.28


def make_inputs(T, H, V, dtype, device, seq_len=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(dtype)  # init-scale head: near-uniform softmax
    labels = torch.randint(0, V, (T,), generator=g)
    base = -torch.log(torch.tensor(float(V)))  # log-probs of a near-uniform softmax
    old = base + 0.1 * torch.randn(T, generator=g)  # ratios around 1: some clipped, most not
    ref = base + 0.1 * torch.randn(T, generator=g)
    seqs = -(-T // seq_len)
    adv_per_seq = torch.randn(seqs, generator=g)
    adv = adv_per_seq.repeat_interleave(seq_len)[:T]
    mask = torch.ones(T, dtype=torch.bool)
    cu = torch.arange(0, seqs * seq_len + 1, seq_len).clamp(max=T)
    cast = lambda x: x.to(device)  # noqa: E731
    return dict(hidden=cast(hidden), weight=cast(weight), labels=cast(labels), old=cast(old), ref=cast(ref),
                adv=cast(adv), adv_per_seq=cast(adv_per_seq), mask=cast(mask), cu=cu, seq_len=seq_len)


def loss_config():
    from kernels.policy_loss import PolicyLossConfig
    return PolicyLossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_type="k3", kl_coef=KL_COEF,
                            aggregation="token-mean")


def build(provider, x):
    """-> forward(hidden, weight) returning a scalar loss whose backward gives the gradients."""
    cfg = loss_config()
    args = (x["old"], x["adv"], x["mask"], x["cu"], cfg)
    if provider == "naive":
        from kernels.reference import policy_loss_ref

        def forward(hidden, weight):
            logits = (hidden @ weight.t()).float()  # [T, V]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, x["labels"].unsqueeze(-1)).squeeze(-1)
            return policy_loss_ref(logp, *args, ref_logprobs=x["ref"])[0]
    elif provider == "reference":
        from kernels.reference import linear_logprobs_ref, policy_loss_ref

        def forward(hidden, weight):
            logp, entropy = linear_logprobs_ref(hidden, weight, x["labels"])
            return policy_loss_ref(logp, *args, ref_logprobs=x["ref"], entropy=entropy)[0]
    elif provider == "chunk_recompute":
        from kernels.logprobs import linear_logprobs
        from kernels.policy_loss import policy_loss

        def forward(hidden, weight):
            logp, _ = linear_logprobs(hidden, weight, x["labels"], with_entropy=False, impl="torch")
            return policy_loss(logp, *args, ref_logprobs=x["ref"], impl="torch")[0]
    elif provider in ("fused_torch", "triton"):
        from kernels.policy_loss import fused_linear_policy_loss
        impl = "torch" if provider == "fused_torch" else "triton"

        def forward(hidden, weight):
            return fused_linear_policy_loss(hidden, weight, x["labels"], *args, ref_logprobs=x["ref"], impl=impl)[0]
    elif provider == "compiled_chunk":
        from torch.utils.checkpoint import checkpoint

        from kernels.reference import policy_loss_ref
        chunk_logprobs = torch.compile(_chunk_logprobs, dynamic=False)
        T = x["labels"].numel()
        chunks = [slice(s, min(s + COMPILED_CHUNK_ROWS, T)) for s in range(0, T, COMPILED_CHUNK_ROWS)]

        def forward(hidden, weight):
            logp = torch.cat([checkpoint(chunk_logprobs, hidden[c], weight, x["labels"][c], use_reentrant=False)
                              for c in chunks])
            return policy_loss_ref(logp, *args, ref_logprobs=x["ref"])[0]
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        liger = LigerFusedLinearGRPOLoss(beta=KL_COEF, compiled=False, chunk_size=1, epsilon_low=EPS_LOW,
                                         epsilon_high=EPS_HIGH, loss_type="bnpo", use_ref_model=True)
        B, L = -(-x["labels"].numel() // x["seq_len"]), x["seq_len"]
        view = lambda t: t.reshape(B, L, *t.shape[1:])  # noqa: E731  [B, L] sequences

        def forward(hidden, weight):
            out = liger(view(hidden), weight, view(x["labels"]), view(x["mask"]).long(), x["adv_per_seq"],
                        ref_per_token_logps=view(x["ref"]), old_per_token_logps=view(x["old"]))
            return out[0] if isinstance(out, tuple) else out
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    return forward


def _chunk_logprobs(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()  # [T_chunk, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def matmul_peak_tflops(dtype=torch.bfloat16, n=8192, reps=20):
    """The device's achievable dense TFLOP/s: best of `reps` n x n x n matmuls (CUDA only)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / best / 1e12


class Memory:
    """Peak memory above a baseline: CUDA allocator stats, or Linux RSS high-water mark."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def _rss(self, field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak_extra(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return self._rss("VmHWM:") - self.base


def measure(provider, T, H, V, dtype, reps, warmup, device):
    x = make_inputs(T, H, V, dtype, device)
    forward = build(provider, x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        hidden = x["hidden"].detach().requires_grad_()
        weight = x["weight"].detach().requires_grad_()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = forward(hidden, weight)
        sync()
        t1, c1 = time.perf_counter(), time.process_time()
        loss.backward()
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        return dict(forward_s=t1 - t0, backward_s=t2 - t1, full_s=t2 - t0, full_cpu_s=c2 - c0)

    for _ in range(warmup):
        step()
    memory = Memory(device)
    memory.start()
    runs = [step() for _ in range(reps)]
    record = dict(min(runs, key=lambda r: r["full_cpu_s"]))  # the least disturbed repetition
    record.update(provider=provider, T=T, H=H, V=V, dtype=str(dtype).replace("torch.", ""), reps=reps,
                  peak_extra_mib=memory.peak_extra() / 2**20, runs=runs, device=str(device),
                  threads=torch.get_num_threads())
    record["tflops"] = 6 * T * H * V / record["full_s"] / 1e12
    if provider == "triton":
        from kernels.logprobs import tuned_configs
        record["tuned"] = tuned_configs()
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", required=True, choices=PROVIDERS)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = measure(a.provider, a.tokens, a.hidden, a.vocab, getattr(torch, a.dtype), a.reps, a.warmup, device)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
