"""subquestions verifier: part splitting and partial credit."""
import pytest

from megatron_vlm.rewards.verifiers.subquestions import subquestions_verifier

META = {"verifiers": ["numeric", "short_answer", "choice"]}
REFERENCE = [42, "Paris", "B"]
CASES = [
    ("(1) 42\n(2) Paris\n(3) B", 1.0, "numbered in parentheses"),
    ("1. 42\n2. London\n3. B", 2 / 3, "one part wrong"),
    ("Part 1: 42\nPart 2: Paris", 2 / 3, "a part missing"),
    ("(a) 42\n(b) paris\n(c) (B)", 1.0, "lettered parts"),
    ("\\boxed{42} \\boxed{Paris} \\boxed{B}", 1.0, "one box per part, in order"),
    ("\\boxed{42} \\boxed{Paris}", 0.0, "boxes do not match the parts: nothing assignable"),
    ("(1) 42\n(1) 41\n(2) Paris\n(3) B", 2 / 3, "a part answered twice scores 0"),
    ("<think>(1) 42\n(2) Paris\n(3) B</think>", 0.0, "answers only in the think block"),
]


@pytest.mark.parametrize("response, expected, why", CASES, ids=[c[2] for c in CASES])
def test_subquestion_cases(response, expected, why):
    assert subquestions_verifier(response, REFERENCE, META) == pytest.approx(expected), why


def test_weights_and_sub_metadata():
    meta = {"verifiers": "numeric", "weights": [3, 1], "sub_metadata": [{}, {"abs_tol": 0.5}]}
    assert subquestions_verifier("(1) 10\n(2) 5.3", [10, 5], meta) == pytest.approx(1.0)
    assert subquestions_verifier("(1) 11\n(2) 5.3", [10, 5], meta) == pytest.approx(0.25)


def test_mismatched_metadata_is_a_config_error():
    with pytest.raises(ValueError, match="'verifiers' has 2 entries for 3 parts"):
        subquestions_verifier("(1) 1", [1, 2, 3], {"verifiers": ["numeric", "numeric"]})
