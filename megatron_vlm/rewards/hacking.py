"""Reward-model hacking monitor: flags when reward-model scores stop agreeing with a verifier.

When a task has both a verifiable answer and an RM score, the two should rank samples alike. A
policy that learns to please the RM (length, tone, format) without being right drives them apart.
Over a window of recent (RM score, verifier score) pairs the monitor reports

    spearman            rank correlation of RM and verifier scores (nan if either is constant)
    false_positive_rate share of verifier-failed samples whose RM score reaches the median RM
                        score of verifier-passed samples

and flags when the correlation falls below `min_correlation` or the false-positive rate exceeds
`max_false_positive_rate` (only once `min_samples` pairs are in the window). The sample ids of
this batch's false positives come back for inspection.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from megatron_vlm.rewards.normalization import average_ranks


@dataclass(kw_only=True)
class HackingMonitorConfig:
    window: int = 512                    # recent (RM, verifier) pairs the statistics use
    min_samples: int = 32                # no flag before this many pairs
    min_correlation: float = 0.2         # flag below this Spearman correlation
    max_false_positive_rate: float = 0.3
    pass_threshold: float = 0.5          # verifier score at or above which a sample passed

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"hacking.window must be >= 2, got {self.window}")
        if not 2 <= self.min_samples <= self.window:
            raise ValueError(f"hacking.min_samples must be in [2, window={self.window}], got {self.min_samples}")
        if not -1 <= self.min_correlation <= 1:
            raise ValueError(f"hacking.min_correlation must be in [-1, 1], got {self.min_correlation}")
        if not 0 <= self.max_false_positive_rate <= 1:
            raise ValueError(f"hacking.max_false_positive_rate must be in [0, 1], got {self.max_false_positive_rate}")


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    rx, ry = average_ranks(xs), average_ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return math.nan
    return statistics.correlation(rx, ry)


def false_positive_threshold(rm: Sequence[float], verifier: Sequence[float], pass_threshold: float) -> float:
    passed = [r for r, v in zip(rm, verifier) if v >= pass_threshold]
    return statistics.median(passed) if passed else math.inf


@dataclass
class HackingReport:
    flagged: bool
    metrics: dict[str, float]
    suspicious_ids: list[Any] = field(default_factory=list)


class HackingMonitor:
    def __init__(self, cfg: HackingMonitorConfig):
        self.cfg = cfg
        self.pairs: deque[tuple[float, float]] = deque(maxlen=cfg.window)

    def update(self, sample_ids: Sequence[Any], rm_scores: Sequence[float],
               verifier_scores: Sequence[float]) -> HackingReport:
        self.pairs.extend(zip(map(float, rm_scores), map(float, verifier_scores)))
        rm, verifier = [p[0] for p in self.pairs], [p[1] for p in self.pairs]
        threshold = false_positive_threshold(rm, verifier, self.cfg.pass_threshold)
        failed = [r for r, v in zip(rm, verifier) if v < self.cfg.pass_threshold]
        fp_rate = sum(r >= threshold for r in failed) / len(failed) if failed else 0.0
        correlation = spearman(rm, verifier)
        enough = len(self.pairs) >= self.cfg.min_samples
        flagged = enough and ((not math.isnan(correlation) and correlation < self.cfg.min_correlation)
                              or fp_rate > self.cfg.max_false_positive_rate)
        suspicious = [i for i, r, v in zip(sample_ids, rm_scores, verifier_scores)
                      if v < self.cfg.pass_threshold and r >= threshold]
        metrics = {"hacking/spearman": correlation, "hacking/false_positive_rate": fp_rate,
                   "hacking/flagged": float(flagged), "hacking/window": float(len(self.pairs))}
        return HackingReport(flagged, metrics, suspicious)
