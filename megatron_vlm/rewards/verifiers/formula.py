"""Formulas checked for symbolic equivalence with sympy: `(x+1)^2` equals `x^2 + 2x + 1`, and an
equation equals any non-zero multiple of itself (`y = 2x + 1` equals `2x - y + 1 = 0`).

Plain-text formulas are parsed by `sympy.parse_expr`, which calls `eval`: a response is admitted
only if it consists of numbers, operators, single-letter variables and a whitelist of function
names, so `__import__('os')` never reaches `eval`. LaTeX (anything with a backslash) goes through
latex2sympy2_extended, which does not eval. `simplify` can run for minutes on adversarial input:
the scorer runs this verifier in a killable worker with a hard timeout.
"""
from __future__ import annotations

import random
import re
from typing import Any, Mapping

from megatron_vlm.rewards.extract import answer_span, final_answer, last_line
from megatron_vlm.rewards.registry import BadReference, register_verifier

ALLOWED_FUNCTIONS = {"sin", "cos", "tan", "exp", "log", "ln", "sqrt", "pi", "E", "I", "abs", "Abs"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_SAFE_CHARS = re.compile(r"^[A-Za-z0-9_\s+\-*/^().,=]*$")
MAX_FORMULA_CHARS = 300


def _is_safe(text: str) -> bool:
    if len(text) > MAX_FORMULA_CHARS or not _SAFE_CHARS.match(text) or "__" in text:
        return False
    return all(len(name) == 1 or name in ALLOWED_FUNCTIONS for name in _IDENTIFIER.findall(text))


def _parse_side(text: str):
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)

    text = text.strip().rstrip(".")
    if "\\" in text or "{" in text:
        from latex2sympy2_extended import latex2sympy
        return latex2sympy(text.replace("$", ""))
    # `2ab` means 2*a*b: unknown multi-letter names are products of single-letter variables
    text = _IDENTIFIER.sub(lambda m: m.group(0) if m.group(0) in ALLOWED_FUNCTIONS or not m.group(0).isalpha()
                           else "*".join(m.group(0)), text)
    if not _is_safe(text):
        raise ValueError(f"formula rejected by the whitelist: {text[:80]!r}")
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    local = {"ln": sympy.log, "e": sympy.E, "E": sympy.E}
    local.update({c: sympy.Symbol(c) for c in "abcdfghjklmnopqrstuvwxyz" if c not in local})
    return parse_expr(text, local_dict=local, transformations=transformations, evaluate=True)


def parse_formula(text: str):
    """An expression, or for an equation `lhs = rhs` the expression `lhs - rhs` (flag True)."""
    sides = text.replace("$", "").split("=")
    if len(sides) > 2:
        sides = sides[-2:]
    if len(sides) == 2:
        return _parse_side(sides[0]) - _parse_side(sides[1]), True
    return _parse_side(sides[0]), False


def _numerically_equal(diff, symbols, trials: int = 8) -> bool:
    """Spot checks at random points, for differences `simplify` cannot reduce to 0."""
    rng = random.Random(0)
    for _ in range(trials):
        point = {s: rng.choice((-1, 1)) * rng.uniform(0.5, 2.0) for s in symbols}
        value = complex(diff.evalf(subs=point))
        if abs(value) > 1e-8:
            return False
    return True


def formulas_equivalent(gold_text: str, answer_text: str) -> bool:
    import sympy

    gold, gold_is_eq = parse_formula(gold_text)
    answer, answer_is_eq = parse_formula(answer_text)
    if gold_is_eq != answer_is_eq:
        return False
    if gold_is_eq:  # equations are equal up to a non-zero constant factor
        ratio = sympy.simplify(answer / gold)
        return bool(ratio.is_number and ratio != 0 and ratio.is_finite)
    diff = sympy.simplify(gold - answer)
    if diff == 0:
        return True
    return _numerically_equal(diff, sorted(diff.free_symbols, key=str))


def _validate_formula(reference: Any, metadata: Mapping[str, Any]) -> None:
    if not isinstance(reference, str) or not reference.strip():
        raise BadReference(f"formula: reference must be a non-empty expression or equation string "
                           f"('(x+1)^2', 'y = 2x + 1'), got {reference!r}")


@register_verifier("formula", validate=_validate_formula)
def formula_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the boxed (else 'answer is ...', else last line) formula equals `reference`.

    For a non-equation answer written as `f(x) = <expr>` the right-hand side is compared when
    metadata `compare_rhs` is true (default true when the reference has no '=').
    """
    answer = final_answer(response)
    span, hedge = answer_span(answer)
    if hedge:
        return 0.0
    candidate = span if span is not None else last_line(answer)
    _validate_formula(reference, metadata)
    gold = reference
    try:
        parse_formula(gold)
    except Exception as e:
        raise BadReference(f"formula: cannot parse the reference {gold[:80]!r} ({type(e).__name__}: {e}); "
                           f"expected an expression or equation such as '(x+1)^2' or 'y = 2x + 1'") from e
    if "=" in candidate and "=" not in gold and metadata.get("compare_rhs", True):
        candidate = candidate.split("=")[-1]
    try:
        return float(formulas_equivalent(gold, candidate))
    except Exception:  # unparsable answer: no credit (the scorer reports worker failures)
        return 0.0
