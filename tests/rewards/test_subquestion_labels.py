"""Class 5 of #17: several labelled parts on one line, parts out of order matched by label,
labels in several languages, and a string reference refused instead of split into characters."""
import pytest

from megatron_vlm.rewards.verifiers.subquestions import split_parts, subquestions_verifier

META = {"verifiers": ["numeric", "short_answer", "choice"]}
REFERENCE = [42, "Paris", "B"]
CASES = [
    ("(1) 42 (2) Paris (3) B", 1.0),
    ("(1) 42, (2) Paris, (3) B", 1.0),
    ("(1) 42; (2) London; (3) B", 2 / 3),
    ("a) 42 b) Paris c) B", 1.0),
    ("(a) 42 (b) Paris (c) (B)", 1.0),          # the option letter (B) is answer text, not a label
    ("(a) 42 (b) Paris (c) (C)", 2 / 3),
    ("Part 1: 42, Part 2: Paris, Part 3: B", 1.0),
    ("(3) B\n(1) 42\n(2) Paris", 1.0),          # out of order, one per line
    ("(2) Paris (3) B (1) 42", 1.0),            # out of order, one line
    ("(2) 42 (1) Paris (3) B", 1 / 3),          # swapped answers are wrong, not re-matched
    ("（1）42 （2）巴黎 （3）B", 2 / 3),          # full-width brackets; 巴黎 is not 'Paris'
    ("问题1：42 问题2：Paris 问题3：B", 1.0),
    ("第1问：42\n第2问：Paris\n第3问：B", 1.0),
    ("Teil 1: 42, Teil 2: Paris, Teil 3: B", 1.0),
    ("Parte 1: 42; Parte 2: Paris; Parte 3: B", 1.0),
    ("Partie 1 : 42, Partie 2 : Paris, Partie 3 : B", 1.0),
    ("(1) 42 (1) 41 (2) Paris (3) B", 2 / 3),   # part 1 answered twice on one line: a hedge
    ("The value is 4.2. (2) Paris (3) B", 2 / 3),  # '4.2.' is no label; part 1 missing
]


@pytest.mark.parametrize("response, expected", CASES, ids=[c[0] for c in CASES])
def test_labels_anywhere(response, expected):
    assert subquestions_verifier(response, REFERENCE, META) == pytest.approx(expected)


def test_function_arguments_are_not_labels():
    assert split_parts("(1) f(1) = 3\n(2) g(2) = 5", 2) == ["f(1) = 3", "g(2) = 5"]
    meta = {"verifiers": "numeric"}
    assert subquestions_verifier("(1) f(1) = 3\n(2) g(2) = 5", [3, 5], meta) == 1.0


@pytest.mark.parametrize("reference", ["Paris", "42", None, [], {"a": 1}])
def test_reference_must_be_a_list(reference):
    with pytest.raises(ValueError, match="subquestions: reference must be a non-empty list"):
        subquestions_verifier("(1) P (2) a", reference, {})
