"""Boolean, sequence / ordering and short-answer verifiers.

All three read the boxed answer, else the last 'answer is ...' line, else a short final answer
(boolean: its first word; sequence and short answer: its last line). Hedges score 0: 'yes or no',
two boxed answers, an ordering that repeats or drops an item, 'Paris or London'.
"""
from __future__ import annotations

import re
import string
from typing import Any, Mapping, Sequence

from megatron_vlm.rewards.extract import (answer_span, final_answer, last_line, normalize_answer, normalize_text,
                                         strip_latex_text)
from megatron_vlm.rewards.lexicon import (ANSWER_COPULAS, HEDGE_WORDS, NEGATORS, NO_WORDS, SEQUENCE_WORDS, YES_WORDS,
                                         alternation, is_cjk, words)
from megatron_vlm.rewards.registry import BadReference, register_verifier

_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_SINGLE_LETTERS = {"y": True, "t": True, "n": False, "f": False}  # only as the whole answer
_POLARITY = {w: True for w in words(YES_WORDS)} | {w: False for w in words(NO_WORDS)}
_POLARITY_WORD = re.compile(alternation(sorted(set(_POLARITY) - set(_SINGLE_LETTERS), key=lambda w: -len(w))),
                            re.IGNORECASE)
_NEGATED = re.compile(rf"{alternation(words(NEGATORS))}\s+(?:\w+\s+)?"
                      rf"{alternation([w for w in _POLARITY if not is_cjk(w) and len(w) > 1])}", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[,.;:!?\n，。；：！？、]")


def _anchored_or(answer: str, fallback: str) -> str | None:
    span, hedge = answer_span(answer)
    if hedge:
        return None
    return span if span is not None else fallback


def _polarity(text: str) -> bool | None:
    """True / False for a yes / no answer in any language of `lexicon`, None when it has no
    yes/no word, both, or a negated one ('not true', 'no es cierto', 'nicht richtig')."""
    text = strip_latex_text(text).lower()
    whole = normalize_text(text)
    if whole in _SINGLE_LETTERS:
        return _SINGLE_LETTERS[whole]
    if _NEGATED.search(text):
        return None
    found = {_POLARITY[m.group(0).lower()] for m in _POLARITY_WORD.finditer(text)}
    return found.pop() if len(found) == 1 else None


def _reference_bool(reference: Any) -> bool:
    if isinstance(reference, bool):
        return reference
    polarity = _polarity(str(reference)) if isinstance(reference, str) else None
    if polarity is None:
        raise BadReference(f"boolean: reference must be a bool or a yes/no word (yes/no/true/false, "
                           f"是/否, sí/no, oui/non, ja/nein), got {reference!r}")
    return polarity


def _validate_boolean(reference: Any, metadata: Mapping[str, Any]) -> None:
    _reference_bool(reference)


@register_verifier("boolean", validate=_validate_boolean)
def boolean_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the answer's polarity (yes/true/correct vs no/false/incorrect) equals `reference`.

    Accepts: the yes/no words of `lexicon` in English, Chinese, Spanish, French and German
    ('Yes', '是的', 'Sí', 'Oui', 'Nein'), boxed, anchored in any of those languages ('答案是：否'),
    or, without an anchor, as the first clause of the final answer ('Ja, weil ...').
    Refuses (0): both polarities ('yes or no'), a negated truth word ('not true', 'no es
    cierto': ambiguous to a word list), no yes/no word, an answer only inside the think block.
    """
    answer = final_answer(response)
    first_clause = _CLAUSE_END.split(answer.strip(), maxsplit=1)[0]
    span = _anchored_or(answer, first_clause)
    if not span:
        return 0.0
    polarity = _polarity(span)
    return float(polarity is not None and polarity == _reference_bool(reference))


_SEQUENCE_SEP = re.compile(
    rf"\s*(?:,|;|、|，|；|\n|-+>|=+>|→|⇒|⟶|⟹|➔|»|>+|<|–|—|\s-\s|{alternation(words(SEQUENCE_WORDS))})\s*",
    re.IGNORECASE)
_FRAME = re.compile(rf"^.*{alternation(words(ANSWER_COPULAS))}\s*", re.IGNORECASE)  # 'The order is B'


def split_sequence(text: str) -> list[str]:
    """'B, A, C' / 'B > A > C' / 'B -> A -> C' / 'B → A → C' / 'B - A - C' / 'B-A-C' / 'B、A、C' /
    'B then A then C' / '[3, 1, 2]' -> normalised items (a run-together 'BAC' stays one item:
    see `_unpack_run_together`)."""
    text = re.sub(r"\\(?:to|rightarrow|Rightarrow|gt|longrightarrow)\b", ">", text.replace("$", ""))
    text = re.split(r"[:：]", text)[-1]  # 'The order is: B > A > C'
    parts = _SEQUENCE_SEP.split(text.strip().strip("[](){}.。"))
    if len(parts) > 1:
        parts[0] = _FRAME.sub("", parts[0]) or parts[0]
    elif re.fullmatch(r"\w+(?:-\w+)+", parts[0].strip()):
        parts = parts[0].split("-")  # 'B-A-C'
    else:
        parts = parts[0].split()
    items = [" ".join(strip_latex_text(p).lower().translate(_PUNCT).split()) for p in parts]
    return [item for item in items if item]  # articles kept: 'A' is an item here


def _unpack_run_together(items: list[str], expected_len: int) -> list[str]:
    """'bac' -> ['b', 'a', 'c'] when the order is of single characters (letters or digits) and
    the one item has exactly one character per expected item."""
    if len(items) == 1 and len(items[0]) == expected_len > 1 and items[0].isalnum():
        return list(items[0])
    return items


def _gold_sequence(reference: Any) -> list[str]:
    if isinstance(reference, str):
        gold = split_sequence(reference)
        if len(gold) == 1 and re.fullmatch(r"[A-Z]{2,}|\d{2,}", reference.strip()):
            gold = list(gold[0])  # 'BAC' / '312': an order of single letters or digits
    elif isinstance(reference, (list, tuple)) and reference:
        gold = [" ".join(strip_latex_text(str(r)).lower().translate(_PUNCT).split()) for r in reference]
    else:
        raise BadReference(f"sequence: reference must be a non-empty list of items or a string like "
                         f"'B > A > C', got {reference!r}")
    if not gold or not all(gold):
        raise BadReference(f"sequence: reference {reference!r} has no items (expected e.g. ['B', 'A', 'C'])")
    return gold


@register_verifier("sequence", validate=lambda reference, metadata: _gold_sequence(reference) and None)
def sequence_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 for the reference order; with metadata `partial` true, the fraction of item pairs in the
    right relative order (Kendall-tau agreement) when the answer is a permutation of the
    reference; an answer that repeats, drops or adds items scores 0.

    Accepts on both sides: items separated by commas, semicolons, '、', new lines, arrows
    (`>`, `->`, `→`, `⇒`, `\\to`), dashes (` - `, `–`, `—`, or `B-A-C` between single words), 'then'
    and its translations in `lexicon`, or run together ('BAC', '312') when every item is a single
    letter or digit. A leading frame ('The order is B, A, C', '顺序是 B、A、C') is dropped.
    Refuses: items inside the think block only, hedges (two orders), anything but a permutation.
    """
    gold = _gold_sequence(reference)
    answer = final_answer(response)
    span = _anchored_or(answer, last_line(answer))
    items = split_sequence(span) if span else []
    if all(len(g) == 1 for g in gold):
        items = _unpack_run_together(items, len(gold))
    if items == gold:
        return 1.0
    if not metadata.get("partial", False) or sorted(items) != sorted(gold) or len(set(gold)) != len(gold):
        return 0.0
    position = {item: i for i, item in enumerate(items)}
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1:]]
    return sum(position[a] < position[b] for a, b in pairs) / len(pairs)


_COPULA_WORDS = {normalize_answer(w) for w in words(ANSWER_COPULAS)}
_HEDGE = re.compile(alternation(normalize_answer(w) for w in words(HEDGE_WORDS)))
_WRONG = re.compile(alternation(normalize_answer(w) for w in words(NO_WORDS) if len(w) > 1 or is_cjk(w)))
_CLAUSE = re.compile(r"(?<!\d)[,;.!?:](?!\d)|[，；。！？：\n]")
SHORT_ANSWER_MODES = ("exact", "sentence")


def _aliases(reference: Any, fold_plurals: bool) -> set[str]:
    aliases = reference if isinstance(reference, (list, tuple)) else [reference]
    if not aliases or any(a is None or not isinstance(a, (str, int, float)) for a in aliases):
        raise BadReference(f"short_answer: reference must be a non-empty string or a list of accepted "
                         f"answers (strings), got {reference!r}")
    normalised = {normalize_answer(str(a), fold_plurals) for a in aliases}
    if "" in normalised:
        raise BadReference(f"short_answer: reference {reference!r} has an empty accepted answer")
    return normalised


def _framed(text: str, alias: str, max_words: int) -> bool:
    """`text` (normalised) states `alias` in a copula frame: '<...> is <alias>' or
    '<alias> is <...>', short, and with no hedge, negation or no-words ('wrong') outside the alias."""
    if len(text.split()) > max_words or alias not in text:
        return False
    cjk = is_cjk(alias)
    if text.endswith(alias) and (cjk or text.endswith(" " + alias)):
        frame = text[:-len(alias)].strip()
        last = frame[-1:] if cjk else (frame.split() or [""])[-1]
        copula = last in _COPULA_WORDS or frame.endswith("would be")
        if copula and not _HEDGE.search(frame) and not _WRONG.search(frame):
            return True
    if text.startswith(alias) and (cjk or text.startswith(alias + " ")):
        rest = text[len(alias):].strip()
        first = rest[:1] if cjk else (rest.split() or [""])[0]
        return first in _COPULA_WORDS and not _HEDGE.search(rest) and not _WRONG.search(rest)
    return False


def _validate_short_answer(reference: Any, metadata: Mapping[str, Any]) -> None:
    _aliases(reference, False)
    if metadata.get("match", "sentence") not in SHORT_ANSWER_MODES:
        raise BadReference(f"short_answer: metadata match must be one of {SHORT_ANSWER_MODES}, "
                           f"got {metadata.get('match')!r}")


@register_verifier("short_answer", validate=_validate_short_answer)
def short_answer_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the answer equals the reference or one of its aliases after normalisation.

    `reference`: a string or a list of accepted answers (aliases); None, empty or non-string
    references are errors. Normalisation (`extract.normalize_answer`): case, accents, full-width
    forms, punctuation, articles in five languages; plural folding with metadata `fold_plurals`.
    The answer is the boxed answer, else the anchored one ('The answer is ...' in any `lexicon`
    language), else the last line. metadata `match`:
    - "exact": the whole answer (or its first clause, 'Paris, the capital of France') must equal
      an alias;
    - "sentence" (default): also accepts an alias stated in a short sentence (at most
      `max_words`, default 12) in a copula frame: 'It is Paris.', 'The capital is Paris',
      'Paris est la capitale', '首都是巴黎'.
    Refuses (0) by design: hedges ('Paris or London', 'maybe Paris', two boxes), negations ('It is
    not Paris', 'Paris is not it', 'Paris is wrong', 'Paris est faux'), an alias that is not the sentence's subject or complement
    ('near Paris', 'The Moon is bigger than the Sun' for 'the Sun'), long sentences, answers only
    in the think block. Set the per-task defaults with `reward.task_metadata`.
    """
    fold = bool(metadata.get("fold_plurals", False))
    mode = metadata.get("match", "sentence")
    if mode not in SHORT_ANSWER_MODES:
        raise BadReference(f"short_answer: metadata match must be one of {SHORT_ANSWER_MODES}, got {mode!r}")
    aliases = _aliases(reference, fold)
    answer = final_answer(response)
    span = _anchored_or(answer, last_line(answer))
    if not span:
        return 0.0
    first_clause = _CLAUSE.split(span.strip(), maxsplit=1)[0]
    candidates = [normalize_answer(text, fold) for text in (span, first_clause)]
    if any(c in aliases for c in candidates):
        return 1.0
    if mode == "exact":
        return 0.0
    sentence = normalize_answer(re.split(r"(?<!\d)[.!?](?!\d)|[。！？\n]", span.strip(), maxsplit=1)[0], fold)
    max_words = int(metadata.get("max_words", 12))
    return float(any(_framed(text, alias, max_words) for text in (sentence, candidates[1]) for alias in aliases))
