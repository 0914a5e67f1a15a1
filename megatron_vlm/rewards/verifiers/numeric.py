"""Numeric answers within a tolerance: integers, decimals, thousands separators, fractions
(`3/4`, `\\frac{3}{4}`), percentages, scientific notation (`1.2e-3`, `1.2 \\times 10^{-3}`) and
units (`12 cm`, `9.8 m/s^2`, `25 cm²`, converted within length / mass / time and their powers and
quotients when the reference names its unit).

A unit's exponent belongs to the unit (`25 cm^2` is 25, never 2). Thousands may be separated by
commas, spaces, thin or no-break spaces, LaTeX `\\,` / `{,}`, or dots when there are at least two
groups (`1.234.567`); a comma followed by one or two digits is a decimal comma (`3,5`). Refused
by design: `1,234` is never 1.234 (English thousands), and units outside `UNITS` are not
converted (an answer in an unknown unit is compared as a bare number).

Reading order: the boxed answer, else the last 'answer is ...' line (up to its first sentence
end), else the last number of the last line. Two different numbers in an anchored answer ('5 or
6'), several distinct boxed answers, and a last line that is nothing but a list of different
numbers ('1, 9', '4 or 7', '3 8') are hedges and score 0: the last number of a bare list is a
guess among them (math-verify reads '1, 9' as a set, which equals no single number). A worked
last line ('3 + 4 = 7', 'so 7 apples') is read as before, for its last number.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Mapping

from megatron_vlm.rewards.extract import answer_span, final_answer, last_line
from megatron_vlm.rewards.lexicon import CAUSE_WORDS, alternation, words
from megatron_vlm.rewards.registry import BadReference, register_verifier

# unit -> (dimension, scale to the dimension's base unit)
UNITS = {
    "m": ("length", 1.0), "km": ("length", 1e3), "cm": ("length", 1e-2), "mm": ("length", 1e-3),
    "g": ("mass", 1.0), "kg": ("mass", 1e3), "mg": ("mass", 1e-3),
    "s": ("time", 1.0), "sec": ("time", 1.0), "ms": ("time", 1e-3), "min": ("time", 60.0),
    "h": ("time", 3600.0), "hr": ("time", 3600.0), "hours": ("time", 3600.0),
}
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_UNIT = r"[a-zA-Zµ]+(?:\^[-+]?\d+)?"
# A unit's exponent ('cm^2', 'm/s^{-2}', 'm²') is part of the unit, never a number of its own.
_TOKEN = re.compile(
    rf"(?<![a-zA-Zµ]\^)(?<![a-zA-Zµ]\^[-+])(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?\s*(?P<pct>%)?"
    rf"\s*(?P<unit>{_UNIT}(?:\s*/\s*{_UNIT}|\s+[a-zA-Zµ]+\^[-+]?\d+)*)?")
_SENTENCE_END = re.compile(rf"(?<!\d)[.;](?!\d)|[。；\n]|{alternation(words(CAUSE_WORDS))}", re.IGNORECASE)
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_FULL_WIDTH = str.maketrans("０１２３４５６７８９％．－＋／", "0123456789%.-+/")  # CJK input methods
_SPACE_GROUPS = re.compile(r"(?<![\d.,])\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3})+(?!\d)")  # 1 234 567
_DOT_GROUPS = re.compile(r"(?<![\d.,])\d{1,3}(?:\.\d{3}){2,}(?![\d.])")             # 1.234.567


def _normalise(text: str) -> str:
    text = text.translate(_FULL_WIDTH).replace("\u2212", "-").replace("\\%", "%")
    text = text.replace("$", "").replace("{,}", ",")
    text = re.sub(r"[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+", lambda m: "^" + m.group(0).translate(_SUPERSCRIPTS), text)
    text = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\(([-+]?[\d.]+)\)/\(([-+]?[\d.]+)\)", r"\1/\2", text)
    text = re.sub(r"-\s*\(([\d.]+)/([\d.]+)\)", r"-\1/\2", text)
    text = re.sub(r"\s*(?:\\times|\\cdot|×|x|\*)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?", r"e\1", text)
    text = re.sub(r"\\(?:text|mathrm)\s*\{\s*([^{}]*)\}", r" \1", text)
    text = re.sub(r"\^\s*\{\s*([-+]?\d+)\s*\}|\^\s+([-+]?\d+)", lambda m: "^" + (m.group(1) or m.group(2)), text)
    text = re.sub(r"\\[,!; ]", "", text)
    text = _SPACE_GROUPS.sub(lambda m: re.sub(r"\D", "", m.group(0)), text)
    text = _DOT_GROUPS.sub(lambda m: m.group(0).replace(".", ""), text)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # 1,234,567 -> 1234567
    return re.sub(r"(?<![\d,.])(\d+),(\d{1,2})(?![\d,])", r"\1.\2", text)  # decimal comma: 3,5 -> 3.5


def unit_info(unit: str) -> tuple[tuple, float] | None:
    """('cm^2' -> ((('length', 2),), 1e-4)): the dimension and the scale to base units, or None
    when a part of the unit is unknown."""
    dims: dict[str, int] = {}
    scale, sign = 1.0, 1
    for slash, base, power in re.findall(r"(/?)\s*([a-zA-Zµ]+)(?:\^([-+]?\d+))?", unit):
        sign = -1 if slash else sign  # everything after '/' is in the denominator
        if base not in UNITS:
            return None
        dim, factor = UNITS[base]
        exponent = sign * int(power or 1)
        dims[dim] = dims.get(dim, 0) + exponent
        scale *= factor ** exponent
    return tuple(sorted((d, p) for d, p in dims.items() if p)), scale


def parse_numbers(text: str) -> list[tuple[float, bool, str | None]]:
    """Every number in `text` as (value, is_percentage, unit or None)."""
    numbers = []
    for match in _TOKEN.finditer(_normalise(text)):
        try:
            value = float(match["num"])
            if match["den"] is not None:
                value = value / float(match["den"])
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
        unit = match["unit"] if match["unit"] and unit_info(match["unit"]) else None
        numbers.append((value, match["pct"] is not None, unit))
    return numbers


_LIST_SEPARATOR = re.compile(r"\s*(?:[,;&]|\band\b|\bor\b)?\s*", re.IGNORECASE)


def bare_list(line: str) -> bool:
    """Whether `line` holds two or more different numbers and nothing else but separators
    (commas, semicolons, 'and', 'or', spaces): '1, 9', '4 or 7', '3 8'; not '3 + 4 = 7'."""
    text = _normalise(line)
    matches = list(_TOKEN.finditer(text))
    values = {round(float(m["num"]) / (float(m["den"]) if m["den"] else 1.0), 12) for m in matches
              if m["den"] is None or float(m["den"]) != 0}
    if len(values) < 2:
        return False
    gaps = [text[:matches[0].start()], text[matches[-1].end():]]
    gaps += [text[a.end():b.start()] for a, b in zip(matches, matches[1:])]
    return not gaps[0].strip() and not gaps[1].strip(" .") and all(_LIST_SEPARATOR.fullmatch(g) for g in gaps[2:])


def extract_number(response: str) -> tuple[float, bool, str | None] | None:
    answer = final_answer(response)
    span, hedge = answer_span(answer)
    if hedge:
        return None
    if span is None:
        line = last_line(answer)
        if bare_list(line):
            return None
        numbers = parse_numbers(line)
        return numbers[-1] if numbers else None
    end = _SENTENCE_END.search(span)
    numbers = parse_numbers(span[:end.start()] if end else span)
    if len({round(n[0], 12) for n in numbers}) != 1:
        return None  # no number, or a hedge between several
    return numbers[0]


def _alternatives(value: float, is_pct: bool) -> list[float]:
    return [value / 100.0, value] if is_pct else [value]


def _gold_number(reference: Any) -> tuple[float, bool, str | None]:
    if isinstance(reference, numbers.Real) and not isinstance(reference, bool) and math.isfinite(reference):
        return float(reference), False, None  # int, float, Fraction, numpy scalars
    gold = parse_numbers(reference) if isinstance(reference, str) else []
    if len(gold) != 1:
        raise BadReference(f"numeric: reference must be a finite number or a string with exactly one number "
                           f"('42', '12 cm', '50%', '3/4'), got {reference!r}")
    return gold[0]


@register_verifier("numeric", validate=lambda reference, metadata: _gold_number(reference) and None)
def numeric_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """1.0 when the answer is within `rel_tol` (default 1e-4) or `abs_tol` (default 1e-8).

    metadata: `rel_tol`, `abs_tol`; `unit` (the reference's unit, e.g. 'cm') converts an answer
    given in another unit of the same dimension. A percentage matches its fraction or its number
    ('50%' matches 0.5 and 50).
    """
    gold_value, gold_pct, gold_unit = _gold_number(reference)
    answer = extract_number(response)
    if answer is None:
        return 0.0
    value, pct, unit = answer
    gold_unit = metadata.get("unit", gold_unit)
    answer_dim, gold_dim = unit_info(unit) if unit else None, unit_info(gold_unit) if gold_unit else None
    if answer_dim and gold_dim and answer_dim[0] == gold_dim[0]:
        value = value * answer_dim[1] / gold_dim[1]
    elif answer_dim and gold_dim:
        return 0.0  # a unit of another dimension
    rel_tol, abs_tol = float(metadata.get("rel_tol", 1e-4)), float(metadata.get("abs_tol", 1e-8))
    return float(any(math.isclose(a, g, rel_tol=rel_tol, abs_tol=abs_tol)
                     for a in _alternatives(value, pct) for g in _alternatives(gold_value, gold_pct)))
