"""Class 6 of #17: short answers stated in a sentence, aliases, normalisation (case, accents,
articles, punctuation, optional plural folding), strictness per task, in several languages."""
import pytest

from megatron_vlm.rewards.extract import normalize_answer
from megatron_vlm.rewards.verifiers.simple import short_answer_verifier

PARIS = ["Paris", "巴黎", "París"]
SENTENCES = [
    # (response, reference, metadata, expected)
    ("It is Paris.", PARIS, {}, 1.0),
    ("The capital of France is Paris.", "Paris", {}, 1.0),
    ("I think it's Paris.", "Paris", {}, 1.0),
    ("Paris is the capital of France.", "Paris", {}, 1.0),
    ("The answer is Paris, the capital of France.", "Paris", {}, 1.0),
    ("Well, it is Paris.", "Paris", {}, 1.0),
    ("首都是巴黎。", PARIS, {}, 1.0),
    ("答案是巴黎", PARIS, {}, 1.0),
    ("La capital de Francia es París.", PARIS, {}, 1.0),
    ("La capitale de la France est Paris.", "paris", {}, 1.0),
    ("Die Hauptstadt ist Paris.", "Paris", {}, 1.0),
    ("Die Antwort lautet: Zürich", "Zurich", {}, 1.0),            # accents folded
    ("ＰＡＲＩＳ", "Paris", {}, 1.0),                               # full-width folded
    ("It is London.", PARIS, {}, 0.0),
    ("首都是伦敦。", PARIS, {}, 0.0),
    ("La capitale est Lyon.", "Paris", {}, 0.0),
    ("Paris or London", "Paris", {}, 0.0),
    ("It is either Paris or London.", "Paris", {}, 0.0),
    ("It is maybe Paris.", "Paris", {}, 0.0),
    ("It is not Paris.", "Paris", {}, 0.0),
    ("Paris is not the capital.", "Paris", {}, 0.0),
    ("Paris is wrong.", "Paris", {}, 0.0),
    ("Paris est faux.", "Paris", {}, 0.0),
    ("It is wrong to say it is Paris.", "Paris", {}, 0.0),
    ("巴黎是错误的", PARIS, {}, 0.0),
    ("巴黎是法国的首都", PARIS, {}, 1.0),
    ("Es París o Londres.", PARIS, {}, 0.0),
    ("Vielleicht ist es Paris oder London.", "Paris", {}, 0.0),
    ("The Moon is bigger than the Sun.", "the Sun", {}, 0.0),       # the alias is not the complement
    ("It is near Paris.", "Paris", {}, 0.0),
    ("Paris London Berlin Rome", "Paris", {}, 0.0),                # spraying candidates
    ("Having looked at all the evidence in the image very carefully, I would conclude that it is Paris",
     "Paris", {}, 0.0),                                          # longer than max_words
    ("It is Paris.", "Paris", {"match": "exact"}, 0.0),             # strict task
    ("\\boxed{Paris}", "Paris", {"match": "exact"}, 1.0),
    ("Paris.", "Paris", {"match": "exact"}, 1.0),
]


@pytest.mark.parametrize("response, reference, metadata, expected", SENTENCES, ids=[s[0][:40] for s in SENTENCES])
def test_short_answers_in_sentences(response, reference, metadata, expected):
    assert short_answer_verifier(response, reference, metadata) == expected


ALIASES = [
    ("NYC", ["New York City", "NYC", "New York"], 1.0),
    ("It is New York.", ["New York City", "NYC", "New York"], 1.0),
    ("\\text{the Big Apple}", ["New York City", "Big Apple"], 1.0),
    ("Boston", ["New York City", "NYC"], 0.0),
]


@pytest.mark.parametrize("response, reference, expected", ALIASES, ids=[a[0] for a in ALIASES])
def test_aliases(response, reference, expected):
    assert short_answer_verifier(response, reference, {}) == expected


def test_plural_folding_is_opt_in():
    assert short_answer_verifier("Cats", "cat", {}) == 0.0
    assert short_answer_verifier("Cats", "cat", {"fold_plurals": True}) == 1.0
    assert short_answer_verifier("The boxes", "box", {"fold_plurals": True}) == 1.0
    assert short_answer_verifier("Glass", "glas", {"fold_plurals": True}) == 0.0
    assert short_answer_verifier("Dogs", "cat", {"fold_plurals": True}) == 0.0


def test_normalize_answer():
    assert normalize_answer("The Eiffel-Tower!") == "eiffel tower"
    assert normalize_answer("l'Everest") == "everest"
    assert normalize_answer("Der Rhein") == normalize_answer("rhein")
    assert normalize_answer("「巴黎」。") == "巴黎"


@pytest.mark.parametrize("reference", [None, [], "", [None], ["Paris", ""], {"a": 1}])
def test_malformed_reference_is_an_error(reference):
    with pytest.raises(ValueError, match="short_answer: reference"):
        short_answer_verifier("None", reference, {})


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="match must be one of"):
        short_answer_verifier("Paris", "Paris", {"match": "fuzzy"})
