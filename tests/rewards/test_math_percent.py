"""Class 3 of #17: percentages in the math verifier. The exact-rational check (which catches
math-verify's float comparison of 1/2^99 and 1/2^98) must not override math-verify's percentage
rule, on either side."""
import pytest

from megatron_vlm.rewards.verifiers.math_answer import math_verifier

CASES = [
    # (response, reference, expected)
    ("\\boxed{50}", "50\\%", 1.0),
    ("The answer is 50", "50%", 1.0),
    ("\\boxed{50\\%}", "50\\%", 1.0),
    ("\\boxed{0.5}", "50\\%", 1.0),
    ("\\boxed{\\frac{1}{2}}", "50\\%", 1.0),
    ("\\boxed{12.5\\%}", "\\frac{1}{8}", 1.0),
    ("\\boxed{25\\%}", "0.25", 1.0),
    ("\\boxed{40}", "50\\%", 0.0),
    ("\\boxed{0.4}", "50\\%", 0.0),
    ("\\boxed{5\\%}", "50\\%", 0.0),
    ("\\boxed{25\\%}", "\\frac{1}{2}", 0.0),
    ("\\boxed{\\frac{1}{2^{99}}}", "\\frac{1}{2^{98}}", 0.0),   # the exact check still applies
]


@pytest.mark.parametrize("response, reference, expected", CASES, ids=[f"{c[0]}|{c[1]}" for c in CASES])
def test_percentages(response, reference, expected):
    assert math_verifier(response, reference, {}) == expected
