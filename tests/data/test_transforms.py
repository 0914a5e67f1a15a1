"""Multiple choice -> fill-in-the-blank, question rendered into the image, seeded mixtures."""
from collections import Counter

import pytest
from PIL import Image

from megatron_vlm.data.transforms import (FILL_BLANK, OPEN_INSTRUCTION, TEXT_IN_IMAGE_PROMPT, MixtureConfig,
                                          PoolDrawer, allocate_counts, mcq_to_fill_blank, mixture, parse_choices,
                                          question_into_image, render_text_into_image)


def test_mcq_parsed_from_text_becomes_open_with_the_option_text_as_reference():
    text = "What is the capital of France?\nA. Berlin\nB) Paris\n(C) Rome\nAnswer with the option's letter."
    assert parse_choices(text)[1] == {"A": "Berlin", "B": "Paris", "C": "Rome"}
    out = mcq_to_fill_blank(text, "B")
    assert out.reference == "Paris" and out.original_letter == "B"
    assert out.question == f"What is the capital of France?\n{OPEN_INSTRUCTION}"
    assert "Berlin" not in out.question and "option's letter" not in out.question


def test_instructions_are_removed_but_not_the_question_on_their_line():
    out = mcq_to_fill_blank("Select the correct answer: what is 2 + 2?", "B", ["3", "4"])
    assert out.question == f"what is 2 + 2?\n{OPEN_INSTRUCTION}" and out.reference == "4"
    out = mcq_to_fill_blank("How many legs has a spider? Answer with the option's letter.", 0, ["8", "6"])
    assert out.question == f"How many legs has a spider?\n{OPEN_INSTRUCTION}"


def test_mcq_with_a_blank_and_structured_choices():
    out = mcq_to_fill_blank("The boiling point of water at sea level is ___ degrees Celsius.", 2, ["90", "95", "100"])
    assert out.question == f"The boiling point of water at sea level is {FILL_BLANK} degrees Celsius."
    assert out.reference == "100"
    assert mcq_to_fill_blank("x ( ) y", "7", {"A": "6", "B": "7"}).reference == "7"  # answer given as option text


@pytest.mark.parametrize("question,choices,answer", [
    ("Which of the following is a prime?", ["4", "6", "7"], "C"),
    ("What do mammals have?", ["Fur", "Milk", "All of the above"], "C"),
    ("Pick the true statements.", ["x", "y", "Both A and B"], 2),
    ("Which option is correct?", ["x", "y"], "A"),
])
def test_mcq_that_needs_its_options_is_not_rewritten(question, choices, answer):
    assert mcq_to_fill_blank(question, answer, choices) is None


def test_mcq_answer_must_match_a_choice():
    with pytest.raises(ValueError, match="answer 'E' matches none of the choices"):
        mcq_to_fill_blank("q", "E", ["a", "b"])


def _photo():
    image = Image.new("RGB", (160, 60), (30, 120, 200))
    image.putpixel((5, 5), (255, 0, 0))
    return image


def test_question_rendered_into_a_band_above_the_image():
    image = _photo()
    out = render_text_into_image(image, "How many red pixels are there?")
    band = out.height - image.height
    assert out.width == image.width and band > 0
    assert out.crop((0, band, 160, out.height)).tobytes() == image.tobytes()  # the image itself is untouched
    text_pixels = [p for p in out.crop((0, 0, 160, band)).getdata() if p != (255, 255, 255)]
    assert len(text_pixels) > 50  # ink was drawn in the band
    assert render_text_into_image(image, "How many red pixels are there?").tobytes() == out.tobytes()  # deterministic
    below = render_text_into_image(image, "q", position="bottom")
    assert below.crop((0, 0, 160, 60)).tobytes() == image.tobytes()


def test_question_into_image_replaces_the_text_prompt():
    image, prompt = question_into_image(_photo(), "What colour is the background?")
    assert prompt == TEXT_IN_IMAGE_PROMPT and "background" not in prompt and image.height > 60


def test_long_questions_wrap_to_the_image_width():
    image = _photo()
    short = render_text_into_image(image, "Short?", font_size=12)
    long = render_text_into_image(image, "A much longer question that cannot fit on one line of this image " * 2,
                                  font_size=12)
    assert long.width == 160 and long.height > short.height + 20
    unbroken = render_text_into_image(image, "x" * 200, font_size=12)  # one word wider than the image
    assert unbroken.width == 160 and unbroken.height > short.height
    with pytest.raises(ValueError, match="position must be 'top' or 'bottom'"):
        render_text_into_image(image, "q", position="left")


def test_mixture_ratio_is_exact_and_deterministic():
    cfg = MixtureConfig(ratios={"text": 1.0, "multimodal": 2.5}, seed=7)
    picked = mixture({"text": 50, "multimodal": 400}, cfg, num_samples=70)
    counts = Counter(source for source, _ in picked)
    assert counts == {"text": 20, "multimodal": 50}  # 1 : 2.5 exactly
    assert mixture({"text": 50, "multimodal": 400}, cfg, num_samples=70) == picked
    assert mixture({"text": 50, "multimodal": 400}, MixtureConfig(ratios=cfg.ratios, seed=8), 70) != picked
    text_indices = [i for source, i in picked if source == "text"]
    assert len(set(text_indices)) == 20 and all(0 <= i < 50 for i in text_indices)  # no repeats within an epoch
    kinds = [source for source, _ in picked]
    assert kinds != sorted(kinds)  # interleaved, not blocked by source


def test_mixture_cycles_small_sources_by_epoch():
    picked = mixture({"a": 3, "b": 100}, MixtureConfig(ratios={"a": 1, "b": 1}), num_samples=12)
    a = Counter(i for source, i in picked if source == "a")
    assert a == {0: 2, 1: 2, 2: 2}  # six draws from three items: each exactly twice


def test_mixture_validation_and_shared_pieces():
    with pytest.raises(ValueError, match="mixture.ratios must be non-negative with a positive sum"):
        MixtureConfig(ratios={"text": 0})
    with pytest.raises(ValueError, match=r"sources without a size: \['video'\]"):
        mixture({"text": 3}, MixtureConfig(ratios={"text": 1, "video": 1}), 4)
    assert allocate_counts({"a": 1, "b": 2.5}, 7) == {"a": 2, "b": 5}
    drawer = PoolDrawer({"p": [10, 11]}, seed=1)
    first = drawer.draw({"p": 2})
    assert sorted(i for _, i in first) == [10, 11] and drawer.cursor == {"p": 2}
