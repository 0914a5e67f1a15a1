"""Per-task reward normalisation, applied before group advantages.

A batch mixes tasks whose rewards differ in scale (a 0/1 verifier, a reward model's logits, an
instruction-following fraction) and in sparsity. Each task's rewards are normalised on their own,
then multiplied by the task's weight:

    none:      r
    mean_std:  (r - mu_task) / (sigma_task + eps), mu and sigma running over every batch seen so
               far, this one included (Chan et al.'s parallel update; population std)
    rank:      (rank(r) - 1) / (n_task - 1) within the batch, ties sharing their average rank
               (0.5 for a single sample), so a task's scale and outliers do not matter

Each mode is a pure function registered by name; the running statistics are a value passed in and
returned, so the scorer can checkpoint them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence


@dataclass(frozen=True)
class RunningStats:
    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 0.0

    def merged(self, values: Sequence[float]) -> "RunningStats":
        """Statistics of the old samples and `values` together (Chan's parallel combination)."""
        n = len(values)
        if n == 0:
            return self
        batch_mean = sum(values) / n
        batch_m2 = sum((v - batch_mean) ** 2 for v in values)
        count = self.count + n
        delta = batch_mean - self.mean
        return RunningStats(count, self.mean + delta * n / count,
                            self.m2 + batch_m2 + delta * delta * self.count * n / count)


NormalizeFn = Callable[[Sequence[float], RunningStats, float], tuple[list[float], RunningStats]]
_NORMALIZERS: dict[str, NormalizeFn] = {}


def register_normalizer(name: str) -> Callable[[NormalizeFn], NormalizeFn]:
    def decorator(fn: NormalizeFn) -> NormalizeFn:
        if name in _NORMALIZERS:
            raise ValueError(f"normalizer {name!r} is already registered")
        _NORMALIZERS[name] = fn
        return fn
    return decorator


def get_normalizer(name: str) -> NormalizeFn:
    if name not in _NORMALIZERS:
        raise KeyError(f"unknown normalization {name!r}; known: {', '.join(sorted(_NORMALIZERS))}")
    return _NORMALIZERS[name]


def normalization_modes() -> list[str]:
    return sorted(_NORMALIZERS)


@register_normalizer("none")
def no_normalization(values, stats, eps):
    return list(values), stats


@register_normalizer("mean_std")
def mean_std_normalization(values, stats, eps):
    stats = stats.merged(values)
    return [(v - stats.mean) / (stats.std + eps) for v in values], stats


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


@register_normalizer("rank")
def rank_normalization(values, stats, eps):
    n = len(values)
    if n == 1:
        return [0.5], stats
    return [(r - 1) / (n - 1) for r in average_ranks(values)], stats


def normalize_by_task(rewards: Sequence[float], tasks: Sequence[str], mode: str,
                      weights: Mapping[str, float], stats: Mapping[str, RunningStats],
                      eps: float = 1e-6) -> tuple[list[float], dict[str, RunningStats]]:
    """Normalise each task's rewards on their own, then weight them (missing weight: 1.0).

    Returns the rewards in input order and the updated statistics (the input is not modified).
    """
    normalize = get_normalizer(mode)
    out = [0.0] * len(rewards)
    new_stats = dict(stats)
    for task in dict.fromkeys(tasks):
        indices = [i for i, t in enumerate(tasks) if t == task]
        values, new_stats[task] = normalize([rewards[i] for i in indices],
                                            new_stats.get(task, RunningStats()), eps)
        weight = weights.get(task, 1.0)
        for i, value in zip(indices, values):
            out[i] = weight * value
    return out, new_stats
