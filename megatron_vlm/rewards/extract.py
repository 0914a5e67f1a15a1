"""Answer extraction shared by the verifiers.

Design decisions (each closes a way a policy games a verifier):
- Only the final answer is read: the text after the last `</think>`. A response whose think block
  never closes has no final answer (an answer only inside the think block earns nothing).
- `\\boxed{}` answers are read one by one, not merged: the verifiers treat several distinct boxed
  answers as a hedge and give it no credit.
- Enormous outputs are cut before any regex or parser sees them: verifiers look at the last
  `MAX_ANSWER_CHARS` characters of the final answer, and a boxed answer longer than
  `MAX_BOXED_CHARS` is ignored.
"""
from __future__ import annotations

import re
import string
import unicodedata

from megatron_vlm.rewards.lexicon import ANSWER_COPULAS, ANSWER_NOUNS, ARTICLES, alternation, words

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_ANSWER_CHARS = 8192   # the tail of the final answer that verifiers read
MAX_BOXED_CHARS = 512     # a longer \boxed{} is not an answer (and could stall a parser)

# 'answer is X', 'Answer: X', 'final answer = X', '答案是 X', 'La respuesta es X', 'Antwort: X';
# not 'answered', not 'check the answer carefully' (the noun must be followed by a copula or ':')
_ANCHOR = re.compile(rf"{alternation(words(ANSWER_NOUNS))}\W{{0,3}}\s*"
                     rf"(?:{alternation(words(ANSWER_COPULAS))}|:|：|=)\s*[:：]?\s*(.+)", re.IGNORECASE)


def final_answer(response: str, max_chars: int | None = MAX_ANSWER_CHARS) -> str:
    """The part of `response` after the think block ('' when the think block is never closed),
    cut to its last `max_chars` characters (None: uncut, for checks that need the full length)."""
    close = response.rfind(THINK_CLOSE)
    if close >= 0:
        text = response[close + len(THINK_CLOSE):]
    elif THINK_OPEN in response:
        return ""
    else:
        text = response
    return (text if max_chars is None else text[-max_chars:]).strip()


MIN_THINK_TOKENS = 3  # distinct words or numbers (a Chinese character counts as one) below which
                      # reasoning is junk: "Left 3, right 7. 3+7=10" has 5, "7" or "ok ok ok" 1
_THINK_TOKEN = re.compile(r"[\u4e00-\u9fff]|[^\W\d_]{2,}|\d+(?:\.\d+)?")


def format_problem(response: str) -> str | None:
    """Why `response` does not follow the chat template's think-then-answer form, or None.

    Well formed: an optional `<think>` at the very start (templates that open the block in the
    prompt leave it out), one `</think>`, reasoning of at least `MIN_THINK_TOKENS` distinct words
    or numbers (the tag itself is not one), then a non-empty final answer with no think tags in it.
    """
    closes = response.count(THINK_CLOSE)
    if closes == 0:
        return "unclosed think block" if THINK_OPEN in response else "no think block"
    if closes > 1:
        return "several </think>"
    reasoning, _, answer = response.partition(THINK_CLOSE)
    opens = reasoning.count(THINK_OPEN)
    if opens > 1 or (opens == 1 and not reasoning.lstrip().startswith(THINK_OPEN)):
        return "<think> not at the start"
    if THINK_OPEN in answer:
        return "<think> after </think>"
    thought = reasoning.replace(THINK_OPEN, "")  # the tag is not reasoning (a prompt may have opened it)
    if len(set(_THINK_TOKEN.findall(thought.lower()))) < MIN_THINK_TOKENS:
        return "empty or junk reasoning"
    if not answer.strip():
        return "no final answer"
    return None


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` in order, braces matched."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for pos in range(start, min(len(text), start + MAX_BOXED_CHARS + 1)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                found.append(text[start:pos].strip())
                break
    return found


def distinct(items: list[str]) -> list[str]:
    """Items with duplicates removed after whitespace normalisation, first occurrence kept."""
    seen, out = set(), []
    for item in items:
        key = re.sub(r"\s+", "", item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def answer_span(text: str) -> tuple[str | None, bool]:
    """The anchored answer in `text` and whether it is a hedge.

    Priority: the boxed answers (several distinct ones are a hedge), then the last
    'answer is ...' / 'Answer: ...' line. Returns (None, False) when nothing is anchored.
    """
    boxes = distinct(boxed_contents(text))
    if boxes:
        return boxes[-1], len(boxes) > 1
    matches = list(_ANCHOR.finditer(text))
    if matches:
        return matches[-1].group(1).strip(), False
    return None, False


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def strip_latex_text(s: str) -> str:
    """`\\text{Paris}` -> `Paris`, `$x$` -> `x`, drops `\\,` `\\!` spacing commands."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|textit|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,!;: ]", " ", s)
    return s.replace("$", "").strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_text(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    s = strip_latex_text(s).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


_ANY_ARTICLE = re.compile(alternation(w.rstrip("'") for w in words(ARTICLES)))


def fold_plural(word: str) -> str:
    """'cats' -> 'cat', 'boxes' -> 'box', 'glass' stays (a crude English fold, opt-in per task)."""
    if len(word) > 3 and re.search(r"(?:ses|xes|zes|ches|shes)$", word):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalize_answer(s: str, fold_plurals: bool = False) -> str:
    """Short-answer normalisation in any script: LaTeX text unwrapped, case folded, accents and
    full-width forms folded ('Zürich' = 'zurich', 'ＡＢＣ' = 'abc'), "'s" read as 'is', every
    punctuation mark a space, articles of the `lexicon` languages dropped, single spaces."""
    s = strip_latex_text(s).casefold()
    s = re.sub(r"(?<=\w)['’]s\b", " is", s)
    s = re.sub(r"\b(l|d)['’](?=\w)", " ", s)  # French elision: l'Everest
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    s = re.sub(r"[^\w\s]|_", " ", unicodedata.normalize("NFKC", s))
    s = _ANY_ARTICLE.sub(" ", s)
    tokens = s.split()
    return " ".join(fold_plural(t) for t in tokens) if fold_plurals else " ".join(tokens)
