"""Held-out accuracy, overall and per kind, from a scored evaluation set.

    metrics = accuracy_metrics(kinds, correct, well_formed, {"larger": larger})
    # eval_accuracy, eval_strict_accuracy, eval_well_formed, eval_samples      (overall)
    # eval/accuracy/<kind>, eval/strict_accuracy/<kind>, eval/samples/<kind>    (per kind)
    # eval/accuracy/<kind>/<column>=<value>, eval/samples/<kind>/<column>=<value>  (eval.slice_by)

Design decisions:
- A sample's kind is its row's `vlm.kinds.column` (`kind` by default), else its reward task, so
  any data with a `kind` or `task` column gets per-kind figures. Per-kind keys are written when
  the rows name a kind, or when there is more than one task; a one-task set without kinds has
  only the overall figures (a per-kind copy of them says nothing).
- Strict accuracy counts a sample that is correct and well formed: `rewards.extract.format_problem`
  finds nothing wrong with it (the think block opened at the start and closed once, reasoning in
  it, a final answer after it), the same check as the scorer's `reward/well_formed` and
  `reward.strict_format`. The numeric verifier alone pays a junk think block followed by the right
  number; strict accuracy does not.
- Slices (`eval.slice_by`, e.g. the digits demo's `larger` = left / right / equal) split each
  kind's accuracy by a column's value: a policy answering max with the left digit scores well when
  the left digit is larger and badly otherwise, which the overall figure hides.
"""
from __future__ import annotations

from typing import Sequence


def sample_kind(metadata: dict, column: str = "kind") -> str:
    """The kind a sample is counted under: its `column` value, else its reward task."""
    value = metadata.get(column)
    return str(value) if value is not None else str(metadata.get("task", "default"))


def mean_by(groups: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """{group: mean of its values}, groups in order of first appearance."""
    sums: dict[str, list[float]] = {}
    for group, value in zip(groups, values, strict=True):
        sums.setdefault(group, []).append(float(value))
    return {group: sum(vals) / len(vals) for group, vals in sums.items()}


def accuracy_metrics(kinds: Sequence[str], correct: Sequence[bool], well_formed: Sequence[bool],
                     slices: dict[str, Sequence] | None = None, per_kind: bool | None = None) -> dict:
    """Overall, per-kind and sliced accuracy of one scored set (see the module docstring).
    `per_kind`: write the per-kind keys (None: when there is more than one kind)."""
    n = len(correct)
    if not (len(kinds) == n == len(well_formed)):
        raise ValueError(f"accuracy_metrics: {len(kinds)} kinds, {n} verdicts, {len(well_formed)} format checks")
    strict = [bool(c and w) for c, w in zip(correct, well_formed)]
    metrics = {"eval_accuracy": sum(map(bool, correct)) / n if n else float("nan"),
               "eval_strict_accuracy": sum(strict) / n if n else float("nan"),
               "eval_well_formed": sum(map(bool, well_formed)) / n if n else float("nan"),
               "eval_samples": n}
    if not (len(set(kinds)) > 1 if per_kind is None else per_kind):
        return metrics
    strict_by_kind = mean_by(kinds, strict)
    for kind, accuracy in mean_by(kinds, correct).items():
        metrics[f"eval/accuracy/{kind}"] = accuracy
        metrics[f"eval/strict_accuracy/{kind}"] = strict_by_kind[kind]
        metrics[f"eval/samples/{kind}"] = sum(k == kind for k in kinds)
    for column, values in (slices or {}).items():
        if len(values) != n:
            raise ValueError(f"accuracy_metrics: slice {column!r} has {len(values)} values for {n} samples")
        groups = [f"{kind}/{column}={value}" for kind, value in zip(kinds, values)]
        for group, accuracy in mean_by(groups, correct).items():
            metrics[f"eval/accuracy/{group}"] = accuracy
            metrics[f"eval/samples/{group}"] = groups.count(group)
    return metrics
