"""Multi-part questions with partial credit: the answer to part i is scored by its own verifier.

Part labels: '(1)', '（1）', '1)', '1.', '(a)', 'a)', 'Part 2:', 'Q3:', 'Teil 2:', 'Parte 2:',
'Partie 2 :', '问题2：', '第2问'. At a line start any of them opens a part; inside a line (several
parts on one line: '(1) 42 (2) Paris (3) B') a label opens a part when it follows a space or
punctuation, is not of the 'n.' form (that is a decimal or a sentence end), is written in the
same style as the first label (so an option letter '(B)' after '(a)' or '(1)' is answer text);
'f(1) = 3' holds no label (a letter before the bracket). Parts are matched by label, in any
order. Without labels: exactly one `\\boxed{}` per part, in order. A part labelled twice scores 0
(a hedge); a missing part scores 0. The reference must be a list (one reference per part): a string
is refused with an error, never split into characters.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from megatron_vlm.rewards.extract import boxed_contents, final_answer
from megatron_vlm.rewards.lexicon import PART_WORDS, words
from megatron_vlm.rewards.registry import BadReference, register_verifier, resolve_reward_fn

_ID = r"\d+|[a-zA-Z]"
_PART_WORD = "|".join(re.escape(w) for w in words(PART_WORDS))
_LABEL = re.compile(
    rf"(?P<word>(?<![^\W\d_])(?:{_PART_WORD})\s*(?P<w>{_ID})(?![^\W_])[.:)：]?)"
    rf"|(?P<zh>第\s*(?P<z>\d+)\s*(?:问|题|小题)[:：]?)"
    rf"|(?P<paren>[(（](?P<p>{_ID})[)）])"
    rf"|(?P<close>(?<![\w(（])(?P<c>{_ID})\))"
    rf"|(?P<dot>(?<![\w.])(?P<d>{_ID})\.(?!\d))", re.IGNORECASE)
_AFTER = re.compile(r"[ \t*:：]*")
_MID_LINE_BEFORE = set(" \t,;，；。:：")


def _label_index(label: str) -> int:
    return int(label) - 1 if label.isdigit() else ord(label.lower()) - ord("a")


def _style(match: re.Match) -> tuple[str, str]:
    form = next(f for f in ("word", "zh", "paren", "close", "dot") if match.group(f))
    label = next(g for g in (match["w"], match["z"], match["p"], match["c"], match["d"]) if g)
    kind = "digit" if label.isdigit() else "upper" if label.isupper() else "lower"
    return form, kind


def _labels(answer: str) -> list[tuple[int, int, int, bool]]:
    """(part index, label start, answer start, at line start) for every accepted label."""
    found, seen, first_style = [], set(), None
    for match in _LABEL.finditer(answer):
        label = next(g for g in (match["w"], match["z"], match["p"], match["c"], match["d"]) if g)
        index, style = _label_index(label), _style(match)
        line_start = answer.rfind("\n", 0, match.start()) + 1
        at_line_start = answer[line_start:match.start()].strip(" \t*#") == ""
        if not at_line_start:
            before = answer[match.start() - 1] if match.start() else " "
            if (style[0] == "dot" or before not in _MID_LINE_BEFORE
                    or (first_style is not None and style != first_style)):
                continue
        first_style = first_style or style
        seen.add(index)
        found.append((index, match.start(), _AFTER.match(answer, match.end()).end(), at_line_start))
    return found


def split_parts(answer: str, num_parts: int) -> list[str | None]:
    """One answer text per part (None when missing or given twice)."""
    labels = _labels(answer)
    parts: list[str | None] = [None] * num_parts
    if labels:
        seen: set[int] = set()
        for (index, _, start, _), following in zip(labels, labels[1:] + [None]):
            end = following[1] if following else len(answer)
            if 0 <= index < num_parts:
                text = answer[start:end].strip().rstrip(",;，；").strip()
                parts[index] = None if index in seen else text
                seen.add(index)
        return parts
    boxes = boxed_contents(answer)
    if len(boxes) == num_parts:
        return [f"\\boxed{{{box}}}" for box in boxes]
    return parts


def _per_part(value: Any, num_parts: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != num_parts:
            raise BadReference(f"subquestions: metadata {name!r} has {len(value)} entries for {num_parts} parts")
        return list(value)
    return [value] * num_parts


def _validate_subquestions(reference: Any, metadata: Mapping[str, Any]) -> None:
    if not isinstance(reference, (list, tuple)) or not reference:
        raise BadReference(f"subquestions: reference must be a non-empty list with one reference per part, "
                           f"got {type(reference).__name__} {reference!r}")
    for name in ("verifiers", "sub_metadata", "weights"):
        _per_part(metadata.get(name, 1.0), len(reference), name)


@register_verifier("subquestions", validate=_validate_subquestions)
def subquestions_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """Weighted mean of the parts' scores; `reference` is the list of part references.

    metadata: `verifiers` (one name for all parts or one per part, default 'short_answer'),
    `sub_metadata` (one dict for all or one per part), `weights` (default equal).
    """
    _validate_subquestions(reference, metadata)
    references: Sequence[Any] = list(reference)
    n = len(references)
    names = _per_part(metadata.get("verifiers", "short_answer"), n, "verifiers")
    sub_metadata = _per_part(metadata.get("sub_metadata", {}), n, "sub_metadata")
    weights = [float(w) for w in _per_part(metadata.get("weights", 1.0), n, "weights")]
    parts = split_parts(final_answer(response), n)
    scores = [resolve_reward_fn(name)(part, ref, meta) if part else 0.0
              for part, ref, name, meta in zip(parts, references, names, sub_metadata)]
    return sum(w * s for w, s in zip(weights, scores)) / sum(weights)
