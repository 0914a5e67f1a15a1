"""boolean, sequence and short-answer verifiers: case tables with the usual games."""
import pytest

from megatron_vlm.rewards.verifiers.simple import boolean_verifier, sequence_verifier, short_answer_verifier

BOOLEAN = [
    ("Yes, because 2 is even.", True, 1.0, "first clause"),
    ("No.", True, 0.0, "wrong polarity"),
    ("\\boxed{True}", "true", 1.0, "boxed"),
    ("Answer: False", "no", 1.0, "anchored, reference as text"),
    ("No, it is not correct", False, 1.0, "negative answer with explanation"),
    ("Y", True, 1.0, "single letter as the whole answer"),
    ("The answer is yes or no", "yes", 0.0, "hedge"),
    ("yes no", True, 0.0, "both polarities"),
    ("<think>yes</think>No", True, 0.0, "think block ignored"),
    ("It is not true", False, 0.0, "negation is ambiguous: no credit"),
]


@pytest.mark.parametrize("response, reference, expected, why", BOOLEAN, ids=[c[3] for c in BOOLEAN])
def test_boolean_cases(response, reference, expected, why):
    assert boolean_verifier(response, reference, {}) == expected, why


def test_boolean_reference_must_be_boolean():
    with pytest.raises(ValueError, match="boolean: reference must be"):
        boolean_verifier("yes", "maybe", {})


SEQUENCE = [
    ("B, A, C", ["B", "A", "C"], {}, 1.0, "comma separated"),
    ("The order is: B > A > C", ["B", "A", "C"], {}, 1.0, "arrows after a colon"),
    ("\\boxed{B, A, C}", "B>A>C", {}, 1.0, "boxed, reference as text"),
    ("[3, 1, 2]", "3,1,2", {}, 1.0, "list syntax"),
    ("A, B, C", ["B", "A", "C"], {}, 0.0, "wrong order, no partial credit"),
    ("\\boxed{A, B, C}", ["B", "A", "C"], {"partial": True}, 2 / 3, "2 of 3 pairs in order"),
    ("C, B, A", ["A", "B", "C"], {"partial": True}, 0.0, "reversed: no pair in order"),
    ("B, B, A, C", ["B", "A", "C"], {"partial": True}, 0.0, "repeating an item"),
    ("B, A", ["B", "A", "C"], {"partial": True}, 0.0, "dropping an item"),
    ("<think>B, A, C</think>", ["B", "A", "C"], {}, 0.0, "answer only in the think block"),
]


@pytest.mark.parametrize("response, reference, metadata, expected, why", SEQUENCE, ids=[c[4] for c in SEQUENCE])
def test_sequence_cases(response, reference, metadata, expected, why):
    assert sequence_verifier(response, reference, metadata) == pytest.approx(expected), why


SHORT = [
    ("The answer is Paris.", "paris", 1.0, "case and punctuation"),
    ("\\boxed{\\text{The Eiffel Tower}}", "Eiffel tower", 1.0, "articles and LaTeX text"),
    ("NYC", ["New York City", "NYC"], 1.0, "alias"),
    ("Paris or London", "Paris", 0.0, "hedge"),
    ("I believe it is in Paris, France, a city that...", "Paris", 0.0, "answer buried in a sentence"),
    ("\\boxed{Paris} \\boxed{London}", "Paris", 0.0, "boxing two answers"),
    ("<think>Paris</think>", "Paris", 0.0, "answer only in the think block"),
]


@pytest.mark.parametrize("response, reference, expected, why", SHORT, ids=[c[3] for c in SHORT])
def test_short_answer_cases(response, reference, expected, why):
    assert short_answer_verifier(response, reference, {}) == expected, why
