"""formula verifier: symbolic equivalence with sympy, and input that must never reach eval."""
import pytest

from megatron_vlm.rewards.verifiers.formula import formula_verifier

CASES = [
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0, "expanded equals factored (LaTeX)"),
    ("The answer is (x+1)^2", "x^2+2*x+1", 1.0, "plain text with implicit multiplication"),
    ("x^2+2x+2", "(x+1)^2", 0.0, "different polynomial"),
    ("y = 2x+1", "2x - y + 1 = 0", 1.0, "equation up to a constant factor"),
    ("y = 2x+2", "2x - y + 1 = 0", 0.0, "different equation"),
    ("f(x) = sin(x)^2 + cos(x)^2", "1", 1.0, "right-hand side of a definition"),
    ("\\boxed{\\frac{1}{2}x}", "x/2", 1.0, "LaTeX fraction"),
    ("2ab", "2*a*b", 1.0, "adjacent letters are a product"),
    ("sqrt(x^2)", "x", 0.0, "not equal for negative x (numeric check samples both signs)"),
    ("log(x^2)", "2*log(x)", 0.0, "not equal for negative x"),
    # games and attacks
    ("\\boxed{x^2} \\boxed{(x+1)^2}", "(x+1)^2", 0.0, "boxing two formulas"),
    ("<think>(x+1)^2</think>", "(x+1)^2", 0.0, "answer only in the think block"),
    ("__import__('os').system('touch /tmp/pwned_by_formula')", "0", 0.0, "code never reaches eval"),
    ("x.__class__", "x", 0.0, "attribute access rejected"),
    ("(" * 400 + "x" + ")" * 400, "x", 0.0, "over-long formula rejected"),
]


@pytest.mark.parametrize("response, reference, expected, why", CASES, ids=[c[3] for c in CASES])
def test_formula_cases(response, reference, expected, why):
    assert formula_verifier(response, reference, {}) == expected, why


def test_code_injection_has_no_effect(tmp_path):
    target = tmp_path / "pwned"
    formula_verifier(f"__import__('os').system('touch {target}')", "0", {})
    assert not target.exists()
