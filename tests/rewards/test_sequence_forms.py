"""Class 4 of #17: orders written run together, with arrows or with dashes, on both the response
and the reference side, in several languages; wrong orders still score 0."""
import pytest

from megatron_vlm.rewards.verifiers.simple import sequence_verifier, split_sequence

GOLD = ["B", "A", "C"]
FORMS = ["BAC", "B-A-C", "B - A - C", "B – A – C", "B—A—C", "B → A → C", "B -> A -> C", "B => A => C",
         "B ⇒ A ⇒ C", "$B \\to A \\to C$", "B >> A >> C", "B、A、C", "顺序是 B、A、C", "B，然后 A，然后 C",
         "The order is B, A, C", "El orden es B, luego A, luego C", "B, puis A, puis C", "B, dann A, dann C",
         "\\boxed{BAC}", "The answer is B-A-C."]


@pytest.mark.parametrize("form", FORMS)
def test_right_order_in_every_form(form):
    assert sequence_verifier(form, GOLD, {}) == 1.0


@pytest.mark.parametrize("form", FORMS)
def test_wrong_order_in_every_form(form):
    assert sequence_verifier(form, ["A", "B", "C"], {}) == 0.0


@pytest.mark.parametrize("reference", ["BAC", "B-A-C", "B → A → C", "B, A, C", "B–A–C", ("B", "A", "C")])
def test_reference_forms(reference):
    assert sequence_verifier("B > A > C", reference, {}) == 1.0
    assert sequence_verifier("A > B > C", reference, {}) == 0.0


MORE = [
    ("312", "312", {}, 1.0),
    ("3-1-2", [3, 1, 2], {}, 1.0),
    ("3 → 2 → 1", [3, 1, 2], {}, 0.0),
    ("BA", GOLD, {}, 0.0),                    # run together but an item short
    ("BAAC", GOLD, {"partial": True}, 0.0),   # repeats an item
    ("ABC", GOLD, {"partial": True}, 2 / 3),  # run together, partial credit
    ("red - green - blue", ["red", "green", "blue"], {}, 1.0),
    ("x-ray → gamma ray", ["x-ray", "gamma ray"], {}, 1.0),   # a hyphen inside an item stays
    ("redgreenblue", ["red", "green", "blue"], {}, 0.0),      # run together only for single characters
]


@pytest.mark.parametrize("response, reference, metadata, expected", MORE, ids=[m[0] for m in MORE])
def test_more_sequences(response, reference, metadata, expected):
    assert sequence_verifier(response, reference, metadata) == pytest.approx(expected)


def test_split_sequence():
    assert split_sequence("B – A – C") == ["b", "a", "c"]
    assert split_sequence("The order is B, A, C") == ["b", "a", "c"]


@pytest.mark.parametrize("reference", [None, [], "", ","])
def test_malformed_reference_is_an_error(reference):
    with pytest.raises(ValueError, match="sequence: reference"):
        sequence_verifier("B, A, C", reference, {})
