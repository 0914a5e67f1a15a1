"""numeric verifier: tolerance, fractions, percentages, units, scientific notation, and games."""
import pytest

from megatron_vlm.rewards.verifiers.numeric import numeric_verifier

CASES = [
    ("42", "42", {}, 1.0, "bare integer"),
    ("The answer is 1,234,567.", "1234567", {}, 1.0, "thousands separators"),
    ("\\boxed{\\frac{3}{4}}", "0.75", {}, 1.0, "LaTeX fraction"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", {}, 1.0, "negative LaTeX fraction"),
    ("so it is 3/4", "0.75", {}, 1.0, "plain fraction"),
    ("Answer: 50%", "0.5", {}, 1.0, "percentage equals its fraction"),
    ("\\boxed{50\\%}", "50", {}, 1.0, "percentage equals its number"),
    ("\\boxed{1.2 \\times 10^{-3}}", "0.0012", {}, 1.0, "LaTeX scientific notation"),
    ("1.2e-3", "0.0012", {}, 1.0, "e notation"),
    ("The answer is 120 cm", "1.2", {"unit": "m"}, 1.0, "unit converted to the reference's"),
    ("\\boxed{12 \\text{ cm}}", "12 cm", {}, 1.0, "unit in LaTeX text"),
    ("The answer is 12 kg", "12", {"unit": "m"}, 0.0, "unit of another dimension"),
    ("The answer is 3.14159.", "3.1416", {"rel_tol": 1e-4}, 1.0, "within relative tolerance"),
    ("The answer is 3.2.", "3.1416", {}, 0.0, "outside tolerance"),
    ("The answer is 3.2.", "3.1416", {"abs_tol": 0.1}, 1.0, "absolute tolerance"),
    ("The answer is 42 because 6*7=42", "42", {}, 1.0, "reasoning after the anchored answer"),
    ("\\boxed{1e400}", "1", {}, 0.0, "overflow is not a number"),
    ("Let me check the answer carefully.\nSo we get 7", "7", {}, 1.0, "'answer' without 'is' or ':' is no anchor"),
    ("I answered that before; now 8", "8", {}, 1.0, "'answered' is no anchor"),
    # games
    ("The answer is 5 or 6", "6", {}, 0.0, "hedging between numbers"),
    ("\\boxed{5}\\boxed{6}", "6", {}, 0.0, "boxing two numbers"),
    ("<think>42</think>", "42", {}, 0.0, "answer only in the think block"),
    ("1 2 3 4 5 6 7 8 9 10 ... 42", "7", {}, 0.0, "listing numbers: only the last counts"),
    ("</think>\n\n1, 9", "9", {}, 0.0, "a bare list of numbers is a hedge, not its last number"),
    ("</think>\n\n1, 9", "1", {}, 0.0, "... nor its first"),
    ("</think>4 or 7.", "7", {}, 0.0, "a bare list with 'or'"),
    ("</think>3 and 8", "8", {}, 0.0, "a bare list with 'and'"),
    ("</think>6 7", "7", {}, 0.0, "a bare list with spaces"),
    ("</think>12 cm; 3 cm", "3 cm", {}, 0.0, "a list of quantities"),
    # not hedges: one value, or a worked line that ends in the answer
    ("</think>7, 7", "7", {}, 1.0, "one number repeated is no hedge"),
    ("</think>3 + 4 = 7", "7", {}, 1.0, "an equation's result is its last number"),
    ("</think>So 9 apples.", "9", {}, 1.0, "one number in words"),
    ("</think>3,5", "3.5", {}, 1.0, "a decimal comma is one number"),
    ("</think>1 234", "1234", {}, 1.0, "space-grouped thousands are one number"),
    ("We compare 1 and 9.\nThe larger is 9", "9", {}, 1.0, "a list earlier in the answer is not the last line"),
]


@pytest.mark.parametrize("response, reference, metadata, expected, why", CASES, ids=[c[4] for c in CASES])
def test_numeric_cases(response, reference, metadata, expected, why):
    assert numeric_verifier(response, reference, metadata) == expected, why


def test_numeric_reference_as_number():
    assert numeric_verifier("\\boxed{0.25}", 0.25, {}) == 1.0
    assert numeric_verifier("\\boxed{1/4}", 1 / 4, {}) == 1.0
