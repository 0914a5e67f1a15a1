"""Trainer -> engine weight sync, and the check that it worked.

`sync_weights` streams HF-named full tensors from the sharded trainer in buckets of at most
`bucket_bytes` (a single larger tensor travels alone), so the extra memory is one bucket plus the
largest tensor. `check_logprobs` is the guard none of the public frameworks ship by default: the
trainer re-scores a few of the engine's own samples and compares its log-probs with the engine's.
A bad sync (a missed tensor, a wrong transpose, a stale bucket) shows up as an O(1) difference
long before it shows up as collapsed rewards; above the configured bound the run stops.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

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

    engine.wake_up(["weights"])
    engine.update_weights(counted())
    engine.wake_up(["kv_cache"])
    return SyncStats(time.perf_counter() - start, stats["tensors"], stats["bytes"],
                     stats["buckets"], stats["largest"])


@dataclass
class LogprobCheck:
    max_abs: float
    mean_abs: float
    tokens: int


def check_logprobs(engine_logprobs: list[list[float]], trainer_logprobs: list[list[float]],
                   bound: float) -> LogprobCheck:
    """Compare per-token log-probs of the same sampled tokens; raise above `bound`."""
    diffs = []
    for index, (engine, trainer) in enumerate(zip(engine_logprobs, trainer_logprobs)):
        if len(engine) != len(trainer):
            raise WeightSyncError(f"sample {index}: engine scored {len(engine)} tokens, trainer "
                                  f"{len(trainer)}")
        diffs.append((torch.tensor(engine) - torch.tensor(trainer)).abs())
    flat = torch.cat(diffs) if diffs else torch.zeros(0)
    result = LogprobCheck(float(flat.max()) if flat.numel() else 0.0,
                          float(flat.mean()) if flat.numel() else 0.0, flat.numel())
    if result.max_abs > bound:
        raise WeightSyncError(
            f"engine and trainer disagree after the weight sync: max |logprob diff| "
            f"{result.max_abs:.3g} > bound {bound:g} (mean {result.mean_abs:.3g} over "
            f"{result.tokens} tokens). The engine is not running the trainer's weights; stopping "
            f"before the rewards collapse.")
    return result
