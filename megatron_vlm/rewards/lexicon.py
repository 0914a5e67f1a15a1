"""Every natural-language word list the verifiers use, in one place, per language.

Languages: English, Chinese, Spanish, French, German (VLM training data is multilingual; add a
language by adding its entries to each table). The verifiers never test a word outside these
tables, so a language missing here is a language whose words are not understood: its answers
still score through boxes, letters and numbers, but not through anchors or yes/no words.

Matching is case-insensitive. Latin-script words match as whole words; Chinese entries match as
substrings (Chinese has no spaces between words).
"""
from __future__ import annotations

import re

LANGUAGES = ("en", "zh", "es", "fr", "de")

# The noun that anchors a final answer ('The answer is 42', '答案是 42', 'La respuesta es 42').
ANSWER_NOUNS = {
    "en": ("final answer", "correct answer", "answer"),
    "zh": ("最终答案", "答案"),
    "es": ("respuesta final", "respuesta correcta", "respuesta"),
    "fr": ("réponse finale", "réponse correcte", "réponse", "reponse"),
    "de": ("endgültige antwort", "richtige antwort", "antwort"),
}
# What may join the noun and the answer besides ':' '：' '=' (also the frame of a short answer
# stated in a sentence: 'The capital is Paris', 'Paris est la capitale').
ANSWER_COPULAS = {
    "en": ("is", "are", "was", "were", "would be"),
    "zh": ("是", "为", "為"),
    "es": ("es", "son", "era", "fue", "sería", "seria"),
    "fr": ("est", "sont", "était", "serait"),
    "de": ("ist", "sind", "war", "lautet", "wäre"),
}

# Yes / no words. Single letters (y, n, t, f) count only as a whole answer.
YES_WORDS = {
    "en": ("yes", "true", "correct", "right", "y", "t"),
    "zh": ("是的", "对的", "正确", "对", "是", "有", "真"),
    "es": ("sí", "si", "verdadero", "cierto", "correcto", "verdad"),
    "fr": ("oui", "vrai", "correct", "exact", "juste"),
    "de": ("ja", "wahr", "richtig", "korrekt", "stimmt"),
}
NO_WORDS = {
    "en": ("no", "false", "incorrect", "wrong", "n", "f"),
    "zh": ("不正确", "不对", "不是", "错误", "没有", "否", "错", "不", "假"),
    "es": ("no", "falso", "incorrecto", "equivocado"),
    "fr": ("non", "faux", "incorrect", "inexact"),
    "de": ("nein", "falsch", "unwahr", "inkorrekt"),
}
# A negator just before a yes/no word ('not true', 'no es cierto', 'pas vrai', 'nicht richtig')
# makes the answer ambiguous to a word list: such answers get no credit.
NEGATORS = {
    "en": ("not", "isn't", "isnt"),
    "es": ("no",),
    "fr": ("pas", "n'est", "ne"),
    "de": ("nicht", "kein", "keine"),
}
# Words that join two candidate answers: outside an accepted answer they make a hedge.
HEDGE_WORDS = {
    "en": ("or", "either", "neither", "nor", "and", "maybe", "perhaps", "not"),
    "zh": ("或者", "或", "还是", "和", "与", "也许", "可能", "不是"),
    "es": ("o", "u", "ni", "y", "e", "quizás", "quizas", "tal vez", "no"),
    "fr": ("ou", "ni", "et", "peut-être", "peut être", "pas"),
    "de": ("oder", "und", "weder", "noch", "vielleicht", "nicht", "kein"),
}
# Words that end the answer and start its justification ('42 because ...').
CAUSE_WORDS = {
    "en": ("because", "since", "as"),
    "zh": ("因为", "由于"),
    "es": ("porque", "ya que", "pues"),
    "fr": ("parce que", "car", "puisque"),
    "de": ("weil", "denn", "da"),
}
# Words that label a part of a multi-part answer ('Part 2: ...', 'Teil 2: ...', '问题2：...').
PART_WORDS = {
    "en": ("part", "question", "q"),
    "zh": ("问题", "小题"),
    "es": ("parte", "pregunta"),
    "fr": ("partie", "question"),
    "de": ("teil", "frage", "aufgabe"),
}
# Leading articles dropped before short answers are compared.
ARTICLES = {
    "en": ("the", "a", "an"),
    "es": ("el", "la", "los", "las", "un", "una"),
    "fr": ("le", "la", "les", "l'", "un", "une"),
    "de": ("der", "die", "das", "ein", "eine"),
}
# Words between the items of an order ('A, then B', 'A puis B', 'A 然后 B').
SEQUENCE_WORDS = {
    "en": ("and then", "then", "followed by"),
    "zh": ("然后", "接着"),
    "es": ("y luego", "luego", "después", "despues"),
    "fr": ("et puis", "puis", "ensuite"),
    "de": ("und dann", "dann", "danach"),
}


def words(table: dict[str, tuple[str, ...]], languages=LANGUAGES) -> tuple[str, ...]:
    """All entries of `table` for `languages`, longest first (so alternations prefer them)."""
    found = {w for lang in languages for w in table.get(lang, ())}
    return tuple(sorted(found, key=lambda w: (-len(w), w)))


def is_cjk(word: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in word)


def alternation(entries) -> str:
    """A regex alternation of `entries`: whole words for Latin script, substrings for Chinese."""
    parts = [re.escape(w) if is_cjk(w) else rf"(?<!\w){re.escape(w)}(?!\w)" for w in entries]
    return "(?:" + "|".join(parts) + ")"
