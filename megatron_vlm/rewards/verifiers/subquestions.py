"""Multi-part questions with partial credit: the answer to part i is scored by its own verifier.

The final answer is split by part labels at line starts ('(1)', '1.', '(a)', 'a)', 'Part 2:',
'Q3:'); without labels, exactly one `\\boxed{}` per part, in order. A part answered twice under
the same label scores 0 for that part (a hedge); a missing part scores 0.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from megatron_vlm.rewards.extract import boxed_contents, final_answer
from megatron_vlm.rewards.registry import register_verifier, resolve_reward_fn

_LABEL = re.compile(
    r"^[ \t*#]*(?:(?:part|question|q)\s*(\d+|[a-z])\b[.:)]?|\((\d+|[a-z])\)|(\d+|[a-z])[.)])[ \t*]*",
    re.IGNORECASE | re.MULTILINE)


def _label_index(label: str) -> int:
    return int(label) - 1 if label.isdigit() else ord(label.lower()) - ord("a")


def split_parts(answer: str, num_parts: int) -> list[str | None]:
    """One answer text per part (None when missing or given twice)."""
    matches = list(_LABEL.finditer(answer))
    parts: list[str | None] = [None] * num_parts
    if matches:
        seen: set[int] = set()
        for match, following in zip(matches, matches[1:] + [None]):
            index = _label_index(next(g for g in match.groups() if g))
            end = following.start() if following else len(answer)
            if 0 <= index < num_parts:
                parts[index] = None if index in seen else answer[match.end():end].strip()
                seen.add(index)
        return parts
    boxes = boxed_contents(answer)
    if len(boxes) == num_parts:
        return [f"\\boxed{{{box}}}" for box in boxes]
    return parts


def _per_part(value: Any, num_parts: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_parts:
            raise ValueError(f"subquestions: metadata {name!r} has {len(value)} entries for {num_parts} parts")
        return list(value)
    return [value] * num_parts


@register_verifier("subquestions")
def subquestions_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """Weighted mean of the parts' scores; `reference` is the list of part references.

    metadata: `verifiers` (one name for all parts or one per part, default 'short_answer'),
    `sub_metadata` (one dict for all or one per part), `weights` (default equal).
    """
    references: Sequence[Any] = list(reference)
    n = len(references)
    names = _per_part(metadata.get("verifiers", "short_answer"), n, "verifiers")
    sub_metadata = _per_part(metadata.get("sub_metadata", {}), n, "sub_metadata")
    weights = [float(w) for w in _per_part(metadata.get("weights", 1.0), n, "weights")]
    parts = split_parts(final_answer(response), n)
    scores = [resolve_reward_fn(name)(part, ref, meta) if part else 0.0
              for part, ref, name, meta in zip(parts, references, names, sub_metadata)]
    return sum(w * s for w, s in zip(weights, scores)) / sum(weights)
