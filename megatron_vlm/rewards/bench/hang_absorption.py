"""How many hanging samples per batch a pool of N reward workers absorbs before a step's scoring
time doubles.

    python -m megatron_vlm.rewards.bench.hang_absorption --workers 1 2 4 --batch 128 --timeout 0.5

A batch of real math-verify samples (boxed fractions, right and wrong) is scored with 0, 1, 2, ...
of its samples replaced by a reward that never returns (killed at `--timeout`, like a
math-verify hang, Math-Verify#65: it spins, taking a core), spread evenly through the batch. Printed per worker count: the
scoring time of each batch over the time with no hang, the largest hang count whose ratio stays
under 2, and the simple model's estimate: a hang costs one worker `timeout` seconds, so with the
work spread over N workers (on at least N cores) the ratio is about 1 + h * timeout / (batch CPU
time), and doubling comes at h ~ batch CPU time / timeout whatever N (N shortens both the batch
and the hangs' share); the kill and the replacement worker add to each hang's cost.
Each figure is the best of `--repeats` after one warm-up batch; the no-hang time is measured
before and after the sweep and the smaller kept (these machines are shared: rerun when the
ratios at 0 hangs stray from 1).
"""
from __future__ import annotations

import argparse
import os
import time

from megatron_vlm.rewards import RewardConfig, RewardSample, RewardScorer

HANG = f"{__name__}:hang"


def hang(response: str, reference, metadata) -> float:
    """Spins like a math-verify hang (CPU-bound until killed), so it also takes a core."""
    while True:
        pass


def make_batch(size: int, hangs: int) -> list[RewardSample]:
    # (i+1) / (2i+2) = 1/2 for even i; (i+1) / (2i+3) != 1/2 for odd i: right and wrong answers
    answers = [f"\\frac{{{i + 1}}}{{{2 * i + 2 + i % 2}}}" for i in range(size)]
    batch = [RewardSample(sample_id=i, task="math", prompt="p", reference="\\frac{1}{2}",
                          response=f"<think>Reduce it.</think> The answer is \\boxed{{{answer}}}")
             for i, answer in enumerate(answers)]
    for k in range(hangs):  # evenly spread, the first at the start of the batch
        i = k * size // hangs
        batch[i] = RewardSample(sample_id=i, task="hang", prompt="p", response="x")
    return batch


def timed(scorer: RewardScorer, batch: list[RewardSample], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.monotonic()
        scorer.score(batch)
        best = min(best, time.monotonic() - start)
    return best


def sweep(workers: int, batch_size: int, timeout_s: float, hang_counts: list[int], repeats: int) -> None:
    cfg = RewardConfig(verifiers={"math": "math", "hang": HANG}, num_workers=workers, timeout_s=timeout_s,
                       max_failure_rate=1.0)
    with RewardScorer(cfg) as scorer:
        scorer.score(make_batch(batch_size, 0))  # workers up, warm, every sample seen once
        base = timed(scorer, make_batch(batch_size, 0), repeats)
        times = {hangs: timed(scorer, make_batch(batch_size, hangs), repeats) for hangs in hang_counts}
        base = min(base, timed(scorer, make_batch(batch_size, 0), repeats))  # again, against drift
        cpu_s = base * min(workers, len(os.sched_getaffinity(0)))  # the batch's work, over the busy cores
        absorbed, doubled, rows = 0, False, []
        for hangs, elapsed in sorted(times.items()):
            ratio = elapsed / base
            model = 1 + hangs * timeout_s / cpu_s
            rows.append(f"  hangs {hangs:3d}: ratio {ratio:5.2f} (model {model:5.2f})")
            doubled = doubled or ratio >= 2
            absorbed = absorbed if doubled else hangs
        cores = len(os.sched_getaffinity(0))
        print(f"workers {workers} on {cores} cores: batch {batch_size}, no-hang scoring {base * 1e3:.0f} ms, "
              f"timeout {timeout_s} s; largest hang count under 2x: {absorbed} (model: {cpu_s / timeout_s:.1f})")
        print("\n".join(rows), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--hangs", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for workers in args.workers:
        sweep(workers, args.batch, args.timeout, args.hangs, args.repeats)


if __name__ == "__main__":
    main()
