"""Multiple-choice answers: a letter (or a set of letters) or the text of an option.

Reading order: the boxed answer, else the last 'answer is ...' line, else a letter opening the
first or the last line of the final answer ('B', '(B)', 'B. Paris'), else option text in the last
line. The extracted set of letters must equal the reference set exactly, which is what defeats the
usual games: listing every letter ('A B C D'), hedging ('A or B'), naming two options' texts, or
boxing two answers (a hedge: 0).

A letter must agree with the option text given with it: 'B. Paris' when Paris is option A, or
'Paris (B)', scores 0 (a contradiction), while text that also names the chosen option ('B
(Paris) rather than A (London)') or names no option ('B, because ...') leaves the letter
standing. Without `options` in the metadata only letters are read.
"""
from __future__ import annotations

import re
import string
from typing import Any, Mapping, Sequence

from megatron_vlm.rewards.extract import answer_span, final_answer, normalize_text, strip_latex_text
from megatron_vlm.rewards.registry import BadReference, register_verifier

_SEP = r"(?:\s*(?:,|;|&|/|\band\b|\bor\b|\s)\s*)"


def _letter_group(letters: str) -> re.Pattern:
    one = rf"[\s(\[*]*([{letters}])(?![A-Za-z0-9])[)\].*:]*"
    return re.compile(rf"^\s*(?:(?:option|choice)\s+)?({one}(?:{_SEP}{one})*)", re.IGNORECASE)


def _letters_in(text: str, letters: str) -> tuple[set[str] | None, str]:
    """The letters a span opens with ('B', '(B) Paris', 'A or B', 'A, C'; None if it opens with
    none) and the text after them ('Paris')."""
    text = strip_latex_text(text)
    packed = re.fullmatch(rf"\W*([{letters}]{{2,{len(letters)}}})\W*", text)
    if packed and len(set(packed.group(1))) == len(packed.group(1)):  # 'AC' in multi-select
        return set(packed.group(1)), ""
    match = _letter_group(letters).match(text)
    if not match:
        return None, text
    # Lower-case words such as 'a' in 'a or b' count only when the span is nothing but letters.
    group = match.group(1)
    found = set(re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", group))
    if not found and group.strip().islower() and len(text.strip()) <= len(group.strip()) + 1:
        found = {c.upper() for c in re.findall(rf"(?<![A-Za-z])([{letters.lower()}])(?![A-Za-z])", group)}
    return found or None, text[match.end():]


def _consistent(chosen: set[str] | None, rest: str, options: Sequence[str], letters: str) -> set[str] | None:
    """`chosen`, unless the text around the letters names only other options ('B. Paris' when
    Paris is option A): then None, a contradiction."""
    if not chosen:
        return chosen
    named = _options_in(rest, options) if options and rest.strip() else None
    trailing = re.search(rf"[(\[]([{letters}])[)\]]\W*$", rest.strip())  # 'B. Paris (A)'
    if (named and not named & chosen) or (trailing and trailing.group(1) not in chosen):
        return None
    return chosen


def _by_text(text: str, options: Sequence[str], letters: str) -> set[str] | None:
    """The options named by their text, unless a bracketed letter names another ('Paris (B)')."""
    named = _options_in(text, options) if options else None
    trailing = re.search(rf"[(\[]([{letters}])[)\]]\W*$", strip_latex_text(text).strip())
    if named and trailing and trailing.group(1) not in named:
        return None
    return named


def _options_in(text: str, options: Sequence[str]) -> set[str] | None:
    """Letters of the options whose text appears in `text` (an exact match wins)."""
    norm = normalize_text(text)
    texts = [normalize_text(o) for o in options]
    exact = {string.ascii_uppercase[i] for i, t in enumerate(texts) if t and t == norm}
    if exact:
        return exact
    found = {string.ascii_uppercase[i] for i, t in enumerate(texts)
             if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", norm)}
    return found or None


def _option_texts(metadata: Mapping[str, Any]) -> list[str]:
    options = metadata.get("options", [])
    if isinstance(options, Mapping):
        return [str(options[k]) for k in sorted(options)]
    return [str(o) for o in options]


def extract_choice(response: str, options: Sequence[str], num_options: int = 10) -> set[str] | None:
    """The set of option letters the response commits to, or None (no answer, a boxed hedge, or
    letters contradicted by the option text given with them)."""
    letters = string.ascii_uppercase[:max(num_options, len(options), 1)]
    answer = final_answer(response)
    span, hedge = answer_span(answer)
    if hedge:
        return None
    if span is not None:
        chosen, rest = _letters_in(span, letters)
        return _consistent(chosen, rest, options, letters) if chosen else _by_text(span, options, letters)
    lines = [line for line in answer.splitlines() if line.strip()]
    if not lines:
        return None
    (first, first_rest), (last, last_rest) = _letters_in(lines[0], letters), _letters_in(lines[-1], letters)
    if first and last and first != last:
        return None
    if last:
        return _consistent(last, last_rest, options, letters)
    if first:
        return _consistent(first, first_rest, options, letters)
    return _by_text(lines[-1], options, letters)


def _reference_letters(reference: Any) -> set[str]:
    if isinstance(reference, str):
        letters = set(re.findall(r"[A-Z]", reference.upper()))
    elif isinstance(reference, (list, tuple, set)):
        letters = {str(r).strip().upper() for r in reference}
    else:
        letters = set()
    if not letters or not all(re.fullmatch(r"[A-Z]", letter) for letter in letters):
        raise BadReference(f"choice: reference must be option letters ('B', 'AC' or ['A', 'C']), got {reference!r}")
    return letters


@register_verifier("choice", validate=lambda reference, metadata: _reference_letters(reference) and None)
def choice_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the chosen letters equal the reference letters ('B', 'AC', ['A', 'C']).

    metadata: `options` (list of option texts, or {letter: text}) enables answering by option text
    and bounds the valid letters; `num_options` bounds them without texts (default 10: A-J).
    """
    options = _option_texts(metadata)
    num_options = int(metadata.get("num_options", len(options) or 10))
    chosen = extract_choice(response, options, num_options)
    return float(chosen is not None and chosen == _reference_letters(reference))
