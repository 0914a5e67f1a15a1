"""Class 2 of #17: numbers next to units (a unit's exponent is never the number) and numbers
written with space, thin-space, dot or LaTeX thousands separators, or a decimal comma."""
import pytest

from megatron_vlm.rewards.verifiers.numeric import numeric_verifier, parse_numbers, unit_info

UNITS = [
    # (response, reference, metadata, expected)
    ("The area is 25 cm^2", "25", {}, 1.0),
    ("The area is 25 cm^2", "2", {}, 0.0),                 # the exponent is not the answer
    ("Die Fläche beträgt 25 cm²", "25", {}, 1.0),
    ("面积为 25 m^{2}", "25", {}, 1.0),
    ("The answer is 25 cm^2.", "25 cm^2", {}, 1.0),         # anchored: not a hedge between 25 and 2
    ("a = 9.8 m/s^2", "9.8", {}, 1.0),
    ("a = 9.8 m s^{-2}", "9.8 m/s^2", {}, 1.0),
    ("g ≈ 9.8 m·s⁻²", "9.8", {}, 1.0),
    ("\\boxed{9.8\\,\\text{m/s}^2}", "9.8", {}, 1.0),
    ("a = 980 cm/s^2", "9.8", {"unit": "m/s^2"}, 1.0),     # converted with the exponent
    ("a = 980 cm/s^2", "980", {"unit": "m/s^2"}, 0.0),
    ("The volume is 2 m^3", "2000000", {"unit": "cm^3"}, 1.0),
    ("The speed is 36 km/h", "10", {"unit": "m/s"}, 1.0),
    ("The speed is 36 km/h", "36", {"unit": "m/s"}, 0.0),
    ("The speed is 36 km", "36", {"unit": "m/s"}, 0.0),      # another dimension
]


@pytest.mark.parametrize("response, reference, metadata, expected", UNITS, ids=[f"{u[0]}|{u[1]}" for u in UNITS])
def test_numbers_next_to_units(response, reference, metadata, expected):
    assert numeric_verifier(response, reference, metadata) == expected


SEPARATORS = [
    ("The population is 1 234 567.", "1234567", 1.0),
    ("La population est de 1\u202f234\u202f567 habitants", "1234567", 1.0),   # narrow no-break space
    ("Total: 1\u2009234\u2009567", "1234567", 1.0),                          # thin space
    ("Total: 12\u00a0500", "12500", 1.0),                                   # no-break space
    ("\\boxed{1\\,234\\,567}", "1234567", 1.0),
    ("\\boxed{1{,}234}", "1234", 1.0),
    ("Die Antwort ist 1.234.567 Einwohner", "1234567", 1.0),
    ("La respuesta es 3,5 cm.", "3.5", 1.0),                                 # decimal comma
    ("答案是 ４２。", "42", 1.0),                                              # full-width digits
    ("答案是 ５０％", "0.5", 1.0),
    ("答案是 ４３。", "42", 0.0),
    ("The population is 1 234 567.", "567", 0.0),
    ("Total: 12\u00a0500", "500", 0.0),
    ("1 2 3 4 5 6 7 8 9 10 ... 42", "7", 0.0),                                # not thousands groups
]


@pytest.mark.parametrize("response, reference, expected", SEPARATORS, ids=[s[0] for s in SEPARATORS])
def test_thousands_separators(response, reference, expected):
    assert numeric_verifier(response, reference, {}) == expected


def test_unit_info():
    assert unit_info("cm^2") == ((("length", 2),), pytest.approx(1e-4))
    assert unit_info("m s^-2")[0] == unit_info("m/s^2")[0] == (("length", 1), ("time", -2))
    assert unit_info("apples") is None
    assert parse_numbers("25 cm^2 and 3 kg") == [(25.0, False, "cm^2"), (3.0, False, "kg")]


def test_reference_as_any_real_number():
    from fractions import Fraction

    import numpy as np
    assert numeric_verifier("\\boxed{1/2}", Fraction(1, 2), {}) == 1.0
    assert numeric_verifier("3", np.int64(3), {}) == 1.0
    assert numeric_verifier("3", np.float32(3.5), {}) == 0.0
