"""math verifier (math-verify 0.9.0): case table, including the ways a policy games it.

These run math-verify in the test process (no input here hangs); the hanging input is exercised
through the worker pool in test_scorer.py.
"""
import time

import pytest

from megatron_vlm.rewards.verifiers.math_answer import math_verifier

CASES = [
    # (response, reference, expected, why)
    ("The answer is \\boxed{4}.", "4", 1.0, "plain boxed integer"),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, "fraction equals decimal"),
    ("\\boxed{0.5}", "\\frac12", 1.0, "decimal equals LaTeX fraction"),
    ("So $x = \\frac{3}{4}$", "0.75", 1.0, "unboxed answer on the last line"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0, "symbolic equality"),
    ("\\boxed{\\sqrt{2}}", "\\sqrt 2", 1.0, "LaTeX variants"),
    ("\\boxed{5}", "4", 0.0, "wrong answer"),
    ("\\boxed{2} and again \\boxed{2}", "2", 1.0, "the same answer boxed twice is not a hedge"),
    ("\\boxed{\\frac{1}{2}} = \\boxed{0.5}", "0.5", 1.0, "one value restated in two forms is not a hedge"),
    # games and traps
    ("\\boxed{3} or \\boxed{4}", "4", 0.0, "hedge: several distinct boxed answers (math-verify merges them)"),
    ("\\boxed{1} \\boxed{2} \\boxed{3} \\boxed{4} \\boxed{5}", "4", 0.0, "boxing every candidate"),
    ("<think>the answer is \\boxed{4}</think>", "4", 0.0, "answer only inside the think block"),
    ("<think>it is \\boxed{4}", "4", 0.0, "think block never closed: no final answer"),
    ("<think>draft \\boxed{3}</think>Final: \\boxed{4}", "4", 1.0, "a draft in the think block does not fail the answer"),
    ("<think>draft \\boxed{4}</think>Final: \\boxed{3}", "4", 0.0, "a right draft does not rescue a wrong answer"),
    ("\\boxed{\\frac{1}{2^{99}}}", "\\frac{1}{2^{98}}", 0.0, "exact rationals compared exactly (math-verify: equal as floats)"),
    ("\\boxed{\\frac{2}{2^{99}}}", "\\frac{1}{2^{98}}", 1.0, "exact rationals that are equal"),
    ("1 2 3 4 5 6 7 8\n9 10 11 12", "4", 0.0, "listing numbers is not an answer"),
    ("", "4", 0.0, "empty response"),
]


@pytest.mark.parametrize("response, reference, expected, why", CASES, ids=[c[3] for c in CASES])
def test_math_cases(response, reference, expected, why):
    assert math_verifier(response, reference, {}) == expected, why


def test_enormous_output_is_cut_before_parsing():
    response = "Let me think. " + "1 + " * 500_000 + "1\n\\boxed{4}"
    start = time.monotonic()
    assert math_verifier(response, "4", {}) == 1.0
    assert math_verifier("9 " * 500_000, "4", {}) == 0.0
    assert time.monotonic() - start < 5.0
