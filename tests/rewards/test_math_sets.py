"""Class 9 of #17: sets and intervals in the math verifier; the policy is documented in
math_answer's module docstring (relations and intervals compare either way round by default)."""
import pytest

from megatron_vlm.rewards.verifiers.math_answer import math_verifier

CASES = [
    # (response, reference, metadata, expected)
    ("\\boxed{\\{3,2,1\\}}", "\\{1,2,3\\}", {}, 1.0),
    ("\\boxed{\\{1,2,3\\}}", "\\{1,2\\}", {}, 0.0),
    ("\\boxed{1, 2}", "\\{2,1\\}", {}, 1.0),
    ("\\boxed{x=1 \\text{ or } x=2}", "\\{1,2\\}", {}, 1.0),
    ("\\boxed{x=1 \\text{ or } x=3}", "\\{1,2\\}", {}, 0.0),
    ("\\boxed{[0,1)}", "[0,1)", {}, 1.0),
    ("\\boxed{[0,1]}", "[0,1)", {}, 0.0),
    ("\\boxed{(1,\\infty)\\cup(-\\infty,0)}", "(-\\infty,0)\\cup(1,\\infty)", {}, 1.0),
    ("\\boxed{(1,\\infty)\\cup(-\\infty,-1)}", "(-\\infty,0)\\cup(1,\\infty)", {}, 0.0),
    ("\\boxed{x > 2}", "(2,\\infty)", {}, 1.0),                     # relation vs interval reference
    ("\\boxed{(2,\\infty)}", "x > 2", {}, 1.0),                     # and the other way round
    ("\\boxed{x \\geq 2}", "(2,\\infty)", {}, 0.0),                  # endpoint differs
    ("\\boxed{x \\geq 2}", "[2,\\infty)", {}, 1.0),
    ("\\boxed{0 \\le x \\le 1}", "[0,1]", {}, 1.0),
    ("\\boxed{0 < x < 1}", "[0,1]", {}, 0.0),
    ("\\boxed{x > 2}", "(2,\\infty)", {"set_relation": False}, 0.0),  # math-verify's default
    ("\\boxed{x<0 \\text{ or } x>1}", "(-\\infty,0)\\cup(1,\\infty)", {}, 0.0),  # refused by design
]


@pytest.mark.parametrize("response, reference, metadata, expected", CASES, ids=[f"{c[0]}|{c[1]}" for c in CASES])
def test_sets_and_intervals(response, reference, metadata, expected):
    assert math_verifier(response, reference, metadata) == expected
