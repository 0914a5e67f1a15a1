"""Math answers checked with math-verify 0.9.0.

math-verify's own timeouts use `signal.alarm` (main thread only; its `TimeoutException` derives
from `BaseException`) and some inputs hang inside `verify` after `parse` returned (e.g.
`\\boxed{10^{10^{10^{10}}}}`, Math-Verify#65). Both library timeouts are therefore turned off here
and the hard limit is the scorer's worker pool, which kills the process. Call this function in
the trainer's process only through `RewardScorer`.

Departures from calling `math_verify.verify(parse(gold), parse(response))` directly:
- only the final answer after `</think>` is read (math-verify reads inside think blocks);
- boxed answers that disagree score 0 (math-verify merges them into one set, which both
  rewards hedging and can fail a correct final answer next to a boxed draft); boxes that restate
  one value (`\\boxed{1/2} = \\boxed{0.5}`) count once;
- without a box, only the last line is parsed (a long list of numbers is not an answer);
- two exact rationals must be equal exactly (math-verify compares floats: 1/2^99 == 1/2^98),
  except when either side is a percentage: math-verify's own percentage rule (`50\\%` equals
  `50`, `0.5` and `1/2`) stands, since the exact comparison would read `50\\%` as 1/2 against 50;
- sets and intervals (policy, metadata `set_relation`, default true): math-verify's
  `allow_set_relation_comp` is on, so a relation and the interval it describes are equal either
  way round (`x > 2` = `(2, \\infty)`, `0 \\le x \\le 1` = `[0, 1]`; math-verify's default
  accepts only a relation as the reference). Endpoints must match (`[0, 1)` != `[0, 1]`,
  `x \\ge 2` != `(2, \\infty)`); sets are unordered (`\\{3,2,1\\}` = `\\{1,2,3\\}`, `1, 2` = `\\{2, 1\\}`);
  `x=1 \\text{ or } x=2` = `\\{1, 2\\}`; unions compare as unions. Refused by design (math-verify
  0.9.0): a union against 'or'-joined relations (`x<0 \\text{ or } x>1`), an ordered pair against
  an interval (`(1, 2)` is an interval when it is the reference); the relation's variable name
  is not checked (`y > 2` = `(2, \\infty)`).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from megatron_vlm.rewards.extract import boxed_contents, distinct, final_answer, last_line
from megatron_vlm.rewards.registry import BadReference, register_verifier

MAX_EQUAL_BOXES = 3  # more boxed answers than this is spraying, even if they agree

# math-verify warns on every call that its timeout is off; the pool enforces the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(text: str) -> list:
    from math_verify import parse  # lazy: sympy costs ~0.5 s to import

    return parse(text, parsing_timeout=None)


def _gold_latex(reference: Any) -> str:
    text = str(reference).strip()
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


def _exact_rationals_differ(gold: list, pred: list) -> bool:
    """True when both answers are exact rational numbers (no floats) and differ exactly."""
    import sympy

    values = []
    for value in (gold[0], pred[0]):
        if not isinstance(value, sympy.Basic) or not value.is_number or value.atoms(sympy.Float):
            return False
        value = value.doit()  # math-verify keeps 1/2**98 as an unevaluated Mul
        if not value.is_Rational:
            return False
        values.append(value)
    return values[0] != values[1]


def _validate_math(reference: Any, metadata: Mapping[str, Any]) -> None:
    """Cheap, in the trainer's process: the form only (math-verify's parse runs in the worker)."""
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)) or not str(reference).strip():
        raise BadReference(f"math: reference must be a non-empty LaTeX or plain answer string (or a number), "
                           f"got {reference!r}")


@register_verifier("math", validate=_validate_math)
def math_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the final answer equals `reference` (LaTeX or plain) under math-verify, else 0.0.

    metadata: `float_rounding` (default 6) digits kept when math-verify compares floats;
    `set_relation` (default true) compares relations with intervals and sets (module docstring).
    """
    from math_verify import verify

    answer = final_answer(response)
    boxes = distinct(boxed_contents(answer))
    if len(boxes) > MAX_EQUAL_BOXES:
        return 0.0
    candidate = f"\\boxed{{{boxes[-1]}}}" if boxes else last_line(answer)[-300:]
    if not candidate:
        return 0.0
    _validate_math(reference, metadata)
    gold = _parse(_gold_latex(reference))
    if not gold:
        raise BadReference(f"math: math-verify cannot parse the reference {str(reference)[:80]!r} "
                           f"(expected LaTeX or a plain answer such as '\\frac{{1}}{{2}}' or '0.5')")
    pred = _parse(candidate)
    if not pred:
        return 0.0
    options = {"float_rounding": int(metadata.get("float_rounding", 6)), "timeout_seconds": None,
               "allow_set_relation_comp": bool(metadata.get("set_relation", True))}
    for other in boxes[:-1]:  # '\boxed{1/2} = \boxed{0.5}' restates; '\boxed{3} or \boxed{4}' hedges
        if not verify(pred, _parse(f"\\boxed{{{other}}}"), **options):
            return 0.0
    equal = verify(gold, pred, **options)
    percentage = any("%" in text for text in (str(reference), candidate))
    return float(equal and (percentage or not _exact_rationals_differ(gold, pred)))
