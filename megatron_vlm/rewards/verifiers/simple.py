"""Boolean, sequence / ordering and short-answer verifiers.

All three read the boxed answer, else the last 'answer is ...' line, else a short final answer
(boolean: its first word; sequence and short answer: its last line). Hedges score 0: 'yes or no',
two boxed answers, an ordering that repeats or drops an item, 'Paris or London'.
"""
from __future__ import annotations

import re
import string
from typing import Any, Mapping, Sequence

from megatron_vlm.rewards.extract import answer_span, final_answer, last_line, normalize_text, strip_latex_text
from megatron_vlm.rewards.registry import register_verifier

_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_TRUE = {"yes", "true", "correct", "right", "y", "t"}
_FALSE = {"no", "false", "incorrect", "wrong", "n", "f"}


def _anchored_or(answer: str, fallback: str) -> str | None:
    span, hedge = answer_span(answer)
    if hedge:
        return None
    return span if span is not None else fallback


def _polarity(text: str) -> bool | None:
    words = normalize_text(text).split()
    found = {w in _TRUE for w in words if w in _TRUE | _FALSE}
    # single letters (y/n/t/f) count only as the whole answer, not inside a sentence
    if len(words) > 1:
        found = {w in _TRUE for w in words if w in (_TRUE | _FALSE) - {"y", "n", "t", "f"}}
    negated = re.search(r"\bnot\s+(true|false|correct|incorrect)\b", text.lower())
    if negated:
        return None  # 'not true' style answers are ambiguous to a word list: no credit
    return found.pop() if len(found) == 1 else None


def _reference_bool(reference: Any) -> bool:
    if isinstance(reference, bool):
        return reference
    polarity = _polarity(str(reference))
    if polarity is None:
        raise ValueError(f"boolean reference must be yes/no/true/false, got {reference!r}")
    return polarity


@register_verifier("boolean")
def boolean_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the answer's polarity (yes/true/correct vs no/false/incorrect) equals `reference`.

    Without an anchor the first clause of the final answer decides ('Yes, because ...').
    """
    answer = final_answer(response)
    first_clause = re.split(r"[,.;:!\n]", answer.strip(), maxsplit=1)[0]
    span = _anchored_or(answer, first_clause)
    if not span:
        return 0.0
    polarity = _polarity(span)
    return float(polarity is not None and polarity == _reference_bool(reference))


def split_sequence(text: str) -> list[str]:
    """'B, A, C' / 'B > A > C' / 'B -> A -> C' / '[3, 1, 2]' -> normalised items."""
    text = re.sub(r"\\(?:to|rightarrow|gt)\b", ">", text.replace("$", ""))
    text = text.rsplit(":", 1)[-1]  # 'The order is: B > A > C'
    parts = re.split(r"\s*(?:,|;|->|→|>|<|\band then\b|\bthen\b|\n)\s*", text.strip().strip("[]()."))
    if len(parts) == 1:
        parts = parts[0].split()
    items = [" ".join(strip_latex_text(p).lower().translate(_PUNCT).split()) for p in parts]
    return [item for item in items if item]  # articles kept: 'A' is an item here


@register_verifier("sequence")
def sequence_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 for the reference order; with metadata `partial` true, the fraction of item pairs in the
    right relative order (Kendall-tau agreement) when the answer is a permutation of the
    reference; an answer that repeats, drops or adds items scores 0.
    """
    gold = split_sequence(reference if isinstance(reference, str) else ",".join(map(str, reference)))
    answer = final_answer(response)
    span = _anchored_or(answer, last_line(answer))
    items = split_sequence(span) if span else []
    if items == gold:
        return 1.0
    if not metadata.get("partial", False) or sorted(items) != sorted(gold) or len(set(gold)) != len(gold):
        return 0.0
    position = {item: i for i, item in enumerate(items)}
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1:]]
    return sum(position[a] < position[b] for a, b in pairs) / len(pairs)


@register_verifier("short_answer")
def short_answer_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the normalised answer (lower case, no punctuation or articles) equals the
    normalised reference or one of its aliases (`reference` may be a list of aliases)."""
    aliases: Sequence[Any] = reference if isinstance(reference, (list, tuple)) else [reference]
    answer = final_answer(response)
    span = _anchored_or(answer, last_line(answer))
    if not span:
        return 0.0
    return float(normalize_text(span) in {normalize_text(str(a)) for a in aliases})
