"""instructions verifier: IFEval-style constraints on the final answer."""
import pytest

from megatron_vlm.rewards.registry import BadReference
from megatron_vlm.rewards.verifiers.instructions import detect_language, instructions_verifier

CASES = [
    ("One two three four.", [{"type": "max_words", "value": 5}], 1.0, "max words met"),
    ("One two three four five six.", [{"type": "max_words", "value": 5}], 0.0, "max words exceeded"),
    ("<think>" + "word " * 100 + "</think>Short.", [{"type": "max_words", "value": 5}], 1.0,
     "thinking does not count against the length limit"),
    ("word " * 3, [{"type": "min_words", "value": 50}], 0.0, "min words"),
    ("The Cat sat.", [{"type": "include_keywords", "keywords": ["cat"]}], 1.0, "keyword, any case"),
    ("The category", [{"type": "include_keywords", "keywords": ["cat"]}], 0.0, "keyword is a whole word"),
    ("No dogs here", [{"type": "exclude_keywords", "keywords": ["dog"]}], 1.0, "plural is another word"),
    ('```json\n{"a": 1}\n```', [{"type": "json", "required_keys": ["a"]}], 1.0, "fenced JSON"),
    ('Here it is: {"a": 1}', [{"type": "json"}], 0.0, "JSON with prose around it"),
    ('{"b": 1}', [{"type": "json", "required_keys": ["a"]}], 0.0, "missing key"),
    ("- a\n- b\n* c", [{"type": "bullet_count", "value": 3}], 1.0, "bullets"),
    ("p1\n\np2", [{"type": "num_paragraphs", "value": 2}], 1.0, "paragraphs"),
    ("<<Title>>\nbody", [{"type": "title"}], 1.0, "title"),
    ("a, b", [{"type": "no_commas"}], 0.0, "comma present"),
    ("all lower", [{"type": "lowercase"}], 1.0, "lower case"),
    ("Le chat est sur la table et il est content.", [{"type": "language", "value": "fr"}], 1.0, "French"),
    ("The cat is on the table.", [{"type": "language", "value": "fr"}], 0.0, "English is not French"),
    ("这是一个测试", [{"type": "language", "value": "zh"}], 1.0, "Chinese by script"),
    ("Short.", [{"type": "max_words", "value": 5}, {"type": "include_keywords", "keywords": ["cat"]}], 0.5,
     "partial credit"),
    ("<think>unfinished", [{"type": "max_words", "value": 5}], 0.0, "no final answer meets nothing"),
    ("x" * 20_000, [{"type": "max_chars", "value": 10_000}], 0.0, "an enormous answer is measured whole"),
    ("cat " * 100_000, [{"type": "include_keywords", "keywords": ["cat"]}, {"type": "max_words", "value": 300}],
     0.5, "keyword stuffing fails the length limit"),
]


@pytest.mark.parametrize("response, constraints, expected, why", CASES, ids=[c[3] for c in CASES])
def test_instruction_cases(response, constraints, expected, why):
    assert instructions_verifier(response, None, {"constraints": constraints}) == expected, why


def test_all_or_nothing():
    meta = {"constraints": [{"type": "max_words", "value": 5}, {"type": "no_commas"}], "all_or_nothing": True}
    assert instructions_verifier("a, b", None, meta) == 0.0
    assert instructions_verifier("a b", None, meta) == 1.0


def test_unknown_constraint_lists_known():
    with pytest.raises(BadReference, match="instructions: unknown constraint 'rhymes'.*max_words"):
        instructions_verifier("x", None, {"constraints": [{"type": "rhymes"}]})


@pytest.mark.parametrize("text, language", [("Der Hund ist nicht hier.", "de"), ("Это тест", "ru"),
                                            ("El perro es de la casa.", "es"), ("12345", None)])
def test_detect_language(text, language):
    assert detect_language(text) == language
