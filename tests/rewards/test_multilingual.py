"""Class 1 of #17: answer anchors and yes/no words in English, Chinese, Spanish, French, German.

Each language has right and wrong answers, anchored and not, so that a fix for one phrasing
cannot pass by accident.
"""
import pytest

from megatron_vlm.rewards.extract import answer_span
from megatron_vlm.rewards.lexicon import ANSWER_NOUNS, LANGUAGES, NO_WORDS, YES_WORDS
from megatron_vlm.rewards.verifiers.choice import choice_verifier
from megatron_vlm.rewards.verifiers.numeric import numeric_verifier
from megatron_vlm.rewards.verifiers.simple import boolean_verifier

ANCHORS = [
    ("The answer is 42.", "42"),
    ("答案是 42。", "42"),
    ("所以最终答案为：42", "42"),
    ("答案：42", "42"),
    ("La respuesta es 42.", "42"),
    ("Respuesta final: 42", "42"),
    ("La réponse est 42.", "42"),
    ("Réponse : 42", "42"),
    ("Die Antwort ist 42.", "42"),
    ("Die Antwort lautet 42.", "42"),
    ("Antwort: 42", "42"),
]


@pytest.mark.parametrize("text, number", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_anchor_in_each_language(text, number):
    span, hedge = answer_span(f"Some reasoning with 7 and 9.\n{text}")
    assert not hedge and span is not None and span.startswith(number), span
    assert numeric_verifier(f"We add 7 and 9 and more.\n{text}", number, {}) == 1.0
    assert numeric_verifier(f"We add 7 and 9 and more.\n{text}", "43", {}) == 0.0


NOT_ANCHORS = ["I answered 3 before; now 8", "Prüfe die Antworten: 8", "Las respuestas 8",
               "回答这个问题需要 8"]


@pytest.mark.parametrize("text", NOT_ANCHORS)
def test_words_that_are_not_anchors(text):
    assert answer_span(text) == (None, False)


def test_every_language_has_every_table():
    for table in (ANSWER_NOUNS, YES_WORDS, NO_WORDS):
        assert set(table) == set(LANGUAGES)


BOOLEAN = [
    # (response, reference, expected)
    ("Yes, because 2 is even.", True, 1.0),
    ("是的，因为 2 是偶数。", True, 1.0),
    ("不是，3 是奇数。", False, 1.0),
    ("不是，3 是奇数。", True, 0.0),
    ("答案是：否", False, 1.0),
    ("答案是：对", False, 0.0),
    ("不对", False, 1.0),
    ("Sí, porque 2 es par.", True, 1.0),
    ("No, porque 3 es impar.", False, 1.0),
    ("La respuesta es: falso", False, 1.0),
    ("La respuesta es: verdadero", False, 0.0),
    ("No es cierto", False, 0.0),        # negated truth word: ambiguous, no credit by design
    ("Oui, car 2 est pair.", True, 1.0),
    ("Non.", True, 0.0),
    ("La réponse est : vrai", True, 1.0),
    ("Ce n'est pas vrai", False, 0.0),   # negated truth word
    ("Ja, weil 2 gerade ist.", True, 1.0),
    ("Nein, 3 ist ungerade.", False, 1.0),
    ("Die Antwort lautet: falsch", True, 0.0),
    ("Das ist nicht richtig", False, 0.0),  # negated truth word
    ("Oui ou non", True, 0.0),           # both polarities
    ("是或否", True, 0.0),
    ("\\boxed{Sí}", "sí", 1.0),
    ("\\boxed{Nein}", "no", 1.0),
    ("<think>Ja</think>Nein", True, 0.0),
]


@pytest.mark.parametrize("response, reference, expected", BOOLEAN, ids=[f"{b[0]}->{b[2]}" for b in BOOLEAN])
def test_boolean_in_each_language(response, reference, expected):
    assert boolean_verifier(response, reference, {}) == expected


def test_boolean_references_in_other_languages():
    assert boolean_verifier("yes", "是", {}) == 1.0
    assert boolean_verifier("no", "nein", {}) == 1.0
    with pytest.raises(ValueError, match="boolean: reference must be"):
        boolean_verifier("yes", "vielleicht", {})


CHOICE = [
    ("答案是 B。", "B", 1.0),
    ("答案是 B。", "C", 0.0),
    ("La respuesta correcta es (C).", "C", 1.0),
    ("La réponse est D.", "D", 1.0),
    ("Die richtige Antwort ist A.", "A", 1.0),
    ("Die richtige Antwort ist A.", "B", 0.0),
]


@pytest.mark.parametrize("response, reference, expected", CHOICE, ids=[c[0] + c[1] for c in CHOICE])
def test_choice_anchors_in_each_language(response, reference, expected):
    assert choice_verifier(f"Analyse der Optionen A, B, C, D.\n{response}", reference, {"num_options": 4}) == expected
