"""Class 7 of #17: a choice letter given with the text of another option scores 0; a letter with
its own option's text, or with text naming no option, keeps its score."""
import pytest

from megatron_vlm.rewards.verifiers.choice import choice_verifier, extract_choice

OPTIONS = {"options": ["Paris", "London", "Berlin", "Madrid"]}
CASES = [
    # (response, reference, expected)
    ("B. London", "B", 1.0),
    ("B. Paris", "B", 0.0),                        # letter B, text of A
    ("B. Paris", "A", 0.0),                        # and not paid as A either
    ("The answer is (B) Paris.", "B", 0.0),
    ("The answer is (A) Paris.", "A", 1.0),
    ("答案是 (C) 柏林", "C", 1.0),                  # text that names no option: the letter stands
    ("答案是 C：Madrid", "C", 0.0),
    ("La respuesta es B: Londres", "B", 1.0),
    ("La respuesta es B: Madrid", "B", 0.0),
    ("Die Antwort ist D (Madrid).", "D", 1.0),
    ("Die Antwort ist D (Berlin).", "D", 0.0),
    ("\\boxed{B} London", "B", 1.0),
    ("B, because London is larger than Paris", "B", 1.0),  # names the chosen option too
    ("B (London) rather than A (Paris)", "B", 1.0),
    ("Paris (B)", "A", 0.0),                       # text of A, letter B
    ("Paris (A)", "A", 1.0),
    ("London", "B", 1.0),
    ("B", "B", 1.0),
    ("B. Paris and London", "B", 1.0),             # names B among others: no contradiction
]


@pytest.mark.parametrize("response, reference, expected", CASES, ids=[f"{c[0]}|{c[1]}" for c in CASES])
def test_letters_and_option_text(response, reference, expected):
    assert choice_verifier(response, reference, OPTIONS) == expected


def test_multi_select_with_texts():
    meta = {"options": ["red", "green", "blue", "yellow"]}
    assert choice_verifier("A, C: red and blue", "AC", meta) == 1.0
    assert choice_verifier("A, C: green and yellow", "AC", meta) == 0.0
    assert extract_choice("B. Paris", OPTIONS["options"]) is None


def test_without_option_texts_only_letters_are_read():
    assert choice_verifier("B. Paris", "B", {"num_options": 4}) == 1.0
