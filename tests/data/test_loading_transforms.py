"""The transforms of issue #6 applied by the loader: multiple choice rewritten as open questions,
questions drawn into the image, and seeded dataset mixtures (load_mixture)."""
import io
import json
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image as PILImage

from megatron_vlm.data.loading import LoadConfig, SourceConfig, SourceError, load_mixture, load_prompts, load_sft
from megatron_vlm.data.transforms import OPEN_INSTRUCTION, TEXT_IN_IMAGE_PROMPT
from megatron_vlm.rewards.registry import resolve_reward_fn
from tests.data.digits_fixtures import png


SPIDER = "How many legs does a spider have?\nA. 6\nB. 8\nC. 10\nAnswer with the option's letter. /nothink"
MCQ_ROWS = [  # choices as a column (letter / text answers), in the text, none, needing their options, wrong
    {"id": "column", "question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome"],
     "answer": "B", "reference": None, "task": "mcq"},
    {"id": "in_text", "question": SPIDER, "choices": None, "answer": None, "reference": "B", "task": "mcq"},
    {"id": "by_text", "question": "Which planet is the largest?", "choices": ["Mars", "Jupiter"],
     "answer": "Jupiter", "reference": None, "task": "mcq"},
    {"id": "open", "question": "What is 3 + 4?", "choices": None, "answer": "7", "reference": None, "task": "math"},
    {"id": "needs_options", "question": "Which of the following is a prime?", "choices": ["4", "6", "7"],
     "answer": "C", "reference": None, "task": "mcq"},
    {"id": "wrong", "question": "Pick one.", "choices": ["a", "b"], "answer": "E", "reference": None, "task": "mcq"},
]


@pytest.fixture()
def mcq_parquet(tmp_path):
    rows = [dict(row, image=png(seed=i)) for i, row in enumerate(MCQ_ROWS)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "mcq.parquet"))
    return tmp_path / "mcq.parquet"


def _load(path, processor, tmp_path, **options):
    return load_prompts(path, processor, LoadConfig(**options), cache_dir=str(tmp_path / "cache"))


def test_multiple_choice_becomes_open_with_the_option_text_as_reference(processor, mcq_parquet, tmp_path):
    result = _load(mcq_parquet, processor, tmp_path, mcq_to_fill_blank=True, mcq_task="open_mcq")
    assert result.counts == {"rows": 6, "loaded": 5, "dropped_too_long": 0, "skipped_bad_image": 0,
                             "mcq_rewritten": 3, "mcq_without_choices": 1, "mcq_not_rewritable": 1,
                             "dropped_mcq_not_rewritable": 0, "skipped_bad_mcq": 1}
    assert any("sample wrong:" in p and "matches none of the choices" in p for p in result.problems)
    by_id = {r.request_id: r for r in result.requests}
    decode = processor.tokenizer.decode
    column, in_text, by_text = by_id["column"], by_id["in_text"], by_id["by_text"]
    assert column.metadata["reference"] == "Paris" and by_text.metadata["reference"] == "Jupiter"
    assert in_text.metadata["reference"] == "8"
    prompt = decode(column.prompt_ids)
    assert "What is the capital of France?" in prompt and OPEN_INSTRUCTION in prompt
    assert not any(option in prompt for option in ("Berlin", "Paris", "Rome"))
    prompt = decode(in_text.prompt_ids)
    assert "How many legs does a spider have?" in prompt
    assert not any(text in prompt for text in ("A. 6", "B. 8", "C. 10", "option's letter"))
    assert in_text.metadata["mode"] == "nothink" and prompt.endswith("<think>\n\n</think>\n\n")  # flag kept
    assert in_text.metadata["original_question"] == SPIDER and in_text.metadata["original_reference"] == "B"
    assert in_text.metadata["choices"] == {"A": "6", "B": "8", "C": "10"}
    assert column.metadata["original_letter"] == "B" and by_text.metadata["original_letter"] == "B"
    assert {r.metadata["task"] for r in (column, in_text, by_text)} == {"open_mcq"}
    # without choices: unchanged; needing its options: kept as the original multiple choice
    assert by_id["open"].metadata["reference"] == "7" and by_id["open"].metadata["task"] == "math"
    kept = by_id["needs_options"]
    assert kept.metadata["reference"] == "C" and kept.metadata["task"] == "mcq"
    assert kept.prompt_ids == _load(mcq_parquet, processor, tmp_path).requests[4].prompt_ids


def test_not_rewritable_rows_can_be_dropped_and_sft_targets_follow_the_rewrite(processor, mcq_parquet, tmp_path):
    result = _load(mcq_parquet, processor, tmp_path, mcq_to_fill_blank=True, mcq_not_rewritable="drop")
    assert result.counts["dropped_mcq_not_rewritable"] == 1 and result.counts["loaded"] == 4
    assert any("dropped sample needs_options:" in p for p in result.problems)
    assert result.counts["rows"] == result.counts["loaded"] + sum(
        v for k, v in result.counts.items() if k.startswith(("dropped_", "skipped_")))
    assert {r.metadata["task"] for r in result.requests} == {"mcq", "math"}  # mcq_task None: the row's own
    jsonl = tmp_path / "sft.jsonl"  # choices as a mapping; the answer-only SFT target is the option text
    jsonl.write_text(json.dumps({"question": "Capital of Italy? /nothink", "choices": {"A": "Rome", "B": "Oslo"},
                                 "answer": "A"}) + "\n")
    (example,) = load_sft(jsonl, processor, LoadConfig(mcq_to_fill_blank=True), cache_dir=str(tmp_path / "c")).requests
    assert processor.tokenizer.decode(example.response_ids) == "Rome<|im_end|>"


def test_answering_with_the_letter_no_longer_pays(processor, mcq_parquet, tmp_path):
    """The reward hack the rewrite removes: under the choice verifier a bare letter scores (1/k by
    chance); on the rewritten question no letter scores, only the answer itself."""
    by_id = {r.request_id: r for r in _load(mcq_parquet, processor, tmp_path, mcq_to_fill_blank=True).requests}
    choice, numeric, short = (resolve_reward_fn(name) for name in ("choice", "numeric", "short_answer"))
    spider, capital = by_id["in_text"].metadata, by_id["column"].metadata
    assert choice("B", spider["original_reference"], {"options": spider["choices"]}) == 1.0  # the original pays
    for letter in "ABC":
        assert numeric(letter, spider["reference"], spider) == 0.0
        assert short(letter, capital["reference"], capital) == 0.0
        assert short(f"The answer is ({letter}).", capital["reference"], capital) == 0.0
    assert numeric("A spider has \\boxed{8} legs.", spider["reference"], spider) == 1.0
    assert short("The answer is Paris.", capital["reference"], capital) == 1.0


def test_question_drawn_into_the_image_replaces_it_in_the_prompt(processor, tmp_path):
    question = "How many red squares are in this picture? /nothink"
    original = png(64, 128, seed=1)
    rows = [{"id": "img", "question": question, "image": original, "reference": "3"},
            {"id": "text", "question": "What is 2 + 5?", "image": None, "reference": "7"}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "q.parquet"))
    instruction = "Answer the question shown in the image."
    result = _load(tmp_path / "q.parquet", processor, tmp_path, question_into_image=True,
                   question_image_prompt=instruction)
    assert result.counts == {"rows": 2, "loaded": 2, "dropped_too_long": 0, "skipped_bad_image": 0,
                             "question_in_image": 1, "question_in_canvas": 1, "skipped_no_image": 0}
    drawn, canvas = result.requests
    prompt = processor.tokenizer.decode(drawn.prompt_ids)
    assert "red squares" not in prompt and instruction in prompt and prompt.endswith("<think>\n\n</think>\n\n")
    assert drawn.metadata["image_question"] == "How many red squares are in this picture?"
    assert drawn.metadata["question"] == instruction + " /nothink"
    before = np.asarray(PILImage.open(io.BytesIO(original)).convert("RGB"))
    after = np.asarray(drawn.images[0])
    band = after.shape[0] - before.shape[0]
    assert after.shape[1] == before.shape[1] and band > 0
    assert (after[band:] == before).all()                   # the picture itself is untouched
    ink = (after[:band].min(axis=2) < 128).sum()
    assert 50 < ink < 0.5 * after[:band, :, 0].size         # dark text on the white band
    assert drawn.prompt_ids.count(processor.image_token_id) == 1
    # a row without an image: the question on a blank canvas of canvas_width, or skipped
    assert canvas.images[0].width == 448 and "2 + 5" not in processor.tokenizer.decode(canvas.prompt_ids)
    assert (np.asarray(canvas.images[0]).min(axis=2) < 128).any()
    skipped = _load(tmp_path / "q.parquet", processor, tmp_path, question_into_image=True,
                    question_image_without_image="skip")
    assert skipped.counts["skipped_no_image"] == 1 and [r.request_id for r in skipped.requests] == ["img"]


def test_rewritten_question_is_the_one_drawn(processor, mcq_parquet, tmp_path):
    result = _load(mcq_parquet, processor, tmp_path, mcq_to_fill_blank=True, question_into_image=True)
    spider = {r.request_id: r for r in result.requests}["in_text"]
    assert spider.metadata["image_question"] == f"How many legs does a spider have?\n{OPEN_INSTRUCTION}"
    assert spider.metadata["question"] == f"{TEXT_IN_IMAGE_PROMPT} /nothink"
    assert result.counts["question_in_image"] == result.counts["loaded"] == 5


@pytest.mark.parametrize("options,match", [
    (dict(mcq_not_rewritable="skip"), "load.mcq_not_rewritable must be 'keep' or 'drop', got 'skip'"),
    (dict(question_image_without_image="blank"), "load.question_image_without_image must be 'canvas' or 'skip'"),
    (dict(question_image_prompt=" "), "load.question_image_prompt must be non-empty"),
    (dict(canvas_width=8), "load.canvas_width must be >= 32 pixels, got 8"),
])
def test_transform_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        LoadConfig(**options)


@pytest.fixture()
def sources(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"id": f"t{i}", "question": f"{i} + 1?", "reference": str(i + 1)}) + "\n"
                            for i in range(12)))
    multimodal = tmp_path / "mm.jsonl"
    multimodal.write_text("".join(json.dumps({"id": f"m{i}", "question": "sum?", "image": "a.png",
                                              "reference": "3", "source": "digits"}) + "\n" for i in range(30)))
    return [SourceConfig(path=str(text), ratio=1, name="text"), SourceConfig(path=str(multimodal), ratio=2.5)]


def test_mixture_draws_the_ratios_deterministically(processor, sources, tmp_path):
    result = load_mixture(sources, processor, num_samples=70, seed=3, cache_dir=str(tmp_path / "c"))
    assert Counter(r.metadata["source"] for r in result.requests) == {"text": 20, "mm": 50}  # 1 : 2.5
    assert {k: result.counts[k] for k in ("loaded/text", "loaded/mm", "drawn/text", "drawn/mm", "samples")} == \
        {"loaded/text": 12, "loaded/mm": 30, "drawn/text": 20, "drawn/mm": 50, "samples": 70}
    ids = [r.request_id for r in result.requests]
    assert len(set(ids)) == 70 and "text/t0" in ids and "mm/m0" in ids
    # 20 drawn of 12 rows: every row once before any twice (one epoch, then the next)
    assert Counter(i.split("~")[0] for i in ids if i.startswith("text/")).most_common()[-1][1] == 1
    assert sum(i.endswith("~1") for i in ids) == 8 + 20
    assert set(ids[:10]) & {f"text/t{i}" for i in range(12)}  # shuffled, not one source after the other
    again = load_mixture(sources, processor, num_samples=70, seed=3, cache_dir=str(tmp_path / "c"))
    assert [r.request_id for r in again.requests] == ids
    other = load_mixture(sources, processor, num_samples=70, seed=4, cache_dir=str(tmp_path / "c"))
    assert [r.request_id for r in other.requests] != ids
    # None: the most samples without repeating a row (12 / 1 = 30 / 2.5 -> 42)
    epoch = load_mixture(sources, processor, seed=3, cache_dir=str(tmp_path / "c"))
    assert epoch.counts["drawn/text"] == 12 and epoch.counts["drawn/mm"] == 30
    assert not any("~" in r.request_id for r in epoch.requests)


def test_mixture_sources_off_bad_or_repeated_are_named(processor, sources, tmp_path):
    off = [*sources, {"path": sources[0].path, "ratio": 0, "name": "off"}]  # dicts work, as a config gives them
    result = load_mixture(off, processor, num_samples=7, cache_dir=str(tmp_path / "c"))
    assert result.counts["loaded/off"] == 12 and result.counts["drawn/off"] == 0
    assert Counter(r.metadata["source"] for r in result.requests) == {"text": 2, "mm": 5}
    missing = SourceConfig(path=str(tmp_path / "nope.jsonl"), ratio=1, name="charts")
    with pytest.raises(SourceError, match=r"mixture source 'charts' \(.*nope\.jsonl\): FileNotFoundError"):
        load_mixture([sources[0], missing], processor, cache_dir=str(tmp_path / "c"))
    broken = tmp_path / "broken.jsonl"  # every row skipped: nothing to draw from
    broken.write_text(json.dumps({"id": "x", "question": "q", "image": "nope.png", "reference": "1"}) + "\n")
    with pytest.raises(SourceError, match="mixture sources 'broken' .* have a positive ratio but no loadable rows"):
        load_mixture([sources[0], SourceConfig(path=str(broken))], processor, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"mixture source names must be unique .* repeated: \['text'\]"):
        load_mixture([sources[0], sources[0]], processor)
    with pytest.raises(ValueError, match="source 'x' .* ratio must be finite and >= 0, got -1"):
        SourceConfig(path="x.jsonl", ratio=-1)
