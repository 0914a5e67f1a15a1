"""choice verifier: letters, option text, and the ways a policy games multiple choice."""
import pytest

from megatron_vlm.rewards.verifiers.choice import choice_verifier

OPTIONS = {"options": ["Paris", "London", "Berlin", "Rome"]}
CASES = [
    ("B", "B", 1.0, "bare letter"),
    ("(B)", "B", 1.0, "parenthesised letter"),
    ("B. London", "B", 1.0, "letter and option text"),
    ("The answer is (B).", "B", 1.0, "anchored sentence"),
    ("**Answer: B**", "B", 1.0, "markdown bold"),
    ("\\boxed{B}", "B", 1.0, "boxed letter"),
    ("\\boxed{\\text{B}}", "B", 1.0, "boxed text letter"),
    ("the answer is b", "B", 1.0, "lower-case letter"),
    ("London", "B", 1.0, "option text alone"),
    ("After comparing the cities, the answer is London.", "B", 1.0, "anchored option text"),
    ("B\n\nBecause London is the capital of the UK.", "B", 1.0, "letter first, explanation after"),
    ("The answer is (C).", "B", 0.0, "wrong letter"),
    ("A, C", "AC", 1.0, "multi-select, exact set"),
    ("The answer is A and C", ["A", "C"], 1.0, "multi-select in words"),
    ("\\boxed{AC}", "AC", 1.0, "multi-select packed letters"),
    ("ABCD", "AC", 0.0, "packed: every letter"),
    ("\\boxed{AAC}", "AC", 0.0, "packed with a repeat is not an answer"),
    ("The answer is: None of the above", "B", 0.0, "no option"),
    # games
    ("A B C D", "B", 0.0, "listing every letter"),
    ("The answer is A or B", "B", 0.0, "hedging between two letters"),
    ("A, B, C, D", "AC", 0.0, "listing every letter in multi-select"),
    ("\\boxed{A} \\boxed{B}", "B", 0.0, "boxing two answers"),
    ("Paris or London", "B", 0.0, "naming two options' texts"),
    ("<think>the answer is B</think>", "B", 0.0, "answer only in the think block"),
    ("<think>maybe A</think>B", "B", 1.0, "think block stripped, final answer read"),
    ("A\n...\nOn reflection: C", "C", 0.0, "first and last line disagree"),
    ("", "B", 0.0, "empty"),
    ("I answered this before.\nB", "B", 1.0, "'answered' is no anchor"),
]


@pytest.mark.parametrize("response, reference, expected, why", CASES, ids=[c[3] for c in CASES])
def test_choice_cases(response, reference, expected, why):
    assert choice_verifier(response, reference, OPTIONS) == expected, why


def test_letters_beyond_the_options_are_not_answers():
    assert choice_verifier("E", "E", {"options": ["a", "b", "c", "d"]}) == 0.0
    assert choice_verifier("E", "E", {}) == 1.0  # without options, A-J are valid


def test_options_given_as_a_mapping():
    options = {"options": {"A": "Paris", "B": "London"}}
    assert choice_verifier("The answer is London.", "B", options) == 1.0


def test_enormous_letter_spam():
    assert choice_verifier("A B C D " * 100_000, "B", OPTIONS) == 0.0
