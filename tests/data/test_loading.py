"""load_prompts: the demo's files and user files, with every dropped or skipped row counted."""
import json
import logging

import pandas as pd
import pytest
from datasets import Dataset, Features, Image, List, Value

from megatron_vlm.data.loading import LoadConfig, PromptTooLong, load_preferences, load_prompts, load_sft
from tests.data.digits_fixtures import demo_assets, png


def test_demo_pool_loads_as_rollout_requests(processor, tmp_path):
    result = load_prompts(demo_assets()["rl"], processor, cache_dir=str(tmp_path))
    assert result.counts == {"rows": 60, "loaded": 60, "dropped_too_long": 0, "skipped_bad_image": 0}
    request = result.requests[0]
    assert request.request_id == "rl-00000" and len(request.images) == 1
    assert request.prompt_ids.count(processor.image_token_id) == 1
    assert request.metadata["task"] == "digits" and request.metadata["verifier"] == "numeric"
    assert request.metadata["reference"] == str(int(request.metadata["reference"]))
    inputs = processor(request.prompt_ids, request.images)
    assert int(inputs["mm_token_type_ids"].sum()) == 8


def test_json_lines_with_relative_paths_and_bad_images_are_counted(processor, tmp_path, caplog):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    (tmp_path / "img" / "broken.png").write_bytes(png()[:40])     # truncated PNG
    (tmp_path / "img" / "wide.png").write_bytes(png(1, 400))      # aspect ratio over 200
    rows = [{"id": "ok", "question": "sum? /nothink", "image": "img/a.png", "reference": "3", "source": "x"},
            {"id": "missing", "question": "sum?", "image": "img/nope.png", "reference": "1"},
            {"id": "truncated", "question": "sum?", "image": "img/broken.png", "reference": "1"},
            {"id": "wide", "question": "sum?", "image": "img/wide.png", "reference": "1"},
            {"question": "no id, no image", "reference": "2"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.data.loading"):
        result = load_prompts([path], processor, LoadConfig(default_task="mine"), cache_dir=str(tmp_path / "cache"))
    assert result.counts == {"rows": 5, "loaded": 2, "dropped_too_long": 0, "skipped_bad_image": 3}
    assert [r.request_id for r in result.requests] == ["ok", "data.jsonl:4"]
    first = result.requests[0]
    assert first.metadata == {"source": "x", "task": "mine", "reference": "3", "mode": "nothink",
                              "question": "sum? /nothink"}
    assert processor.tokenizer.decode(first.prompt_ids).endswith("assistant\n<think>\n\n</think>\n\n")
    assert result.requests[1].images == [] and processor.image_token_id not in result.requests[1].prompt_ids
    for sample_id, reason in (("missing", "FileNotFoundError"), ("truncated", "cannot read image"),
                              ("wide", "processor rejects")):
        assert any(f"sample {sample_id}:" in p and reason in p for p in result.problems), (sample_id, result.problems)
        assert f"sample {sample_id}:" in caplog.text


def test_parquet_bytes_image_features_and_image_lists(processor, tmp_path):
    good, corrupt = png(), b"\x89PNG not really"
    raw = Dataset.from_dict({"id": ["a", "b"], "question": ["q", "q"], "image": [good, corrupt],
                             "reference": ["1", "2"]})
    raw.to_parquet(str(tmp_path / "raw.parquet"))
    typed = Dataset.from_dict({"id": ["c", "d"], "question": ["q", "q"], "reference": ["1", "2"],
                               "images": [[{"bytes": good, "path": None}, {"bytes": png(8, 8), "path": None}],
                                          [{"bytes": corrupt, "path": None}]]},
                              features=Features(id=Value("string"), question=Value("string"),
                                                reference=Value("string"), images=List(Image())))
    typed.to_parquet(str(tmp_path / "typed.parquet"))
    result = load_prompts([tmp_path / "raw.parquet", tmp_path / "typed.parquet"], processor,
                          cache_dir=str(tmp_path / "cache"))
    assert result.counts == {"rows": 4, "loaded": 2, "dropped_too_long": 0, "skipped_bad_image": 2}
    assert [r.request_id for r in result.requests] == ["a", "c"]
    two = result.requests[1]
    assert len(two.images) == 2 and two.prompt_ids.count(processor.image_token_id) == 2
    assert processor(two.prompt_ids, two.images)["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 4]]
    assert any("sample b:" in p for p in result.problems) and any("sample d:" in p for p in result.problems)


def test_too_long_prompts_drop_with_a_counter_or_raise(processor, tmp_path):
    path = demo_assets()["rl"]
    lengths = [processor(r.prompt_ids, r.images)["input_ids"].shape[1]
               for r in load_prompts(path, processor, cache_dir=str(tmp_path)).requests]
    limit = sorted(lengths)[len(lengths) // 2]
    result = load_prompts(path, processor, LoadConfig(max_prompt_length=limit), cache_dir=str(tmp_path))
    too_long = sum(length > limit for length in lengths)
    assert 0 < too_long < len(lengths)
    assert result.counts == {"rows": 60, "loaded": 60 - too_long, "dropped_too_long": too_long, "skipped_bad_image": 0}
    assert all("max_prompt_length" in p for p in result.problems) and len(result.problems) == too_long
    with pytest.raises(PromptTooLong, match=r"sample rl-\d+: prompt of \d+ tokens .* max_prompt_length"):
        load_prompts(path, processor, LoadConfig(max_prompt_length=limit, on_too_long="raise"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="load.on_too_long must be 'drop' or 'raise', got 'skip'"):
        LoadConfig(on_too_long="skip")


def test_sft_examples_carry_the_target_and_count_long_sequences(processor, tmp_path):
    path = demo_assets()["sft"]
    rows = pd.read_parquet(path)
    result = load_sft(path, processor, cache_dir=str(tmp_path))
    assert result.counts["loaded"] == len(rows) == 30
    example = result.requests[0]
    assert processor.tokenizer.decode(example.response_ids) == rows.iloc[0]["response"]
    # the trainer's SFT stage reads the target from load_prompts' metadata: keep it there
    assert load_prompts(path, processor, cache_dir=str(tmp_path)).requests[0].metadata["response"] == \
        rows.iloc[0]["response"]
    assert processor.tokenizer.decode(example.prompt_ids).endswith("<|im_start|>assistant\n")  # think mode
    assert example.metadata["reference"] == rows.iloc[0]["answer"] and example.prompt_ids.count(
        processor.image_token_id) == 1
    total = [processor.expanded_length(e.prompt_ids, e.images) + len(e.response_ids) for e in result.requests]
    limit = sorted(total)[len(total) // 2]
    dropped = load_sft(path, processor, LoadConfig(max_sequence_length=limit), cache_dir=str(tmp_path))
    assert dropped.counts["dropped_too_long"] == sum(t > limit for t in total) > 0
    assert dropped.counts["loaded"] + dropped.counts["dropped_too_long"] == 30
    # answer-only rows render the target from `answer` (+ `thinking`)
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_text(json.dumps({"question": "2+2? /nothink", "answer": "4"}) + "\n")
    (only,) = load_sft(jsonl, processor, cache_dir=str(tmp_path / "c")).requests
    assert processor.tokenizer.decode(only.response_ids) == "4<|im_end|>"


def test_preference_pairs_load_with_their_prompt_and_both_responses(processor, tmp_path):
    path = demo_assets()["pref"]
    rows = pd.read_parquet(path)
    result = load_preferences(path, processor, cache_dir=str(tmp_path))
    assert result.counts == {"rows": 24, "loaded": 24, "dropped_too_long": 0, "skipped_bad_image": 0}
    request, chosen, rejected = result.requests[0]  # unpacks as trainer.preference.pair_batch takes it
    decode = processor.tokenizer.decode
    assert decode(chosen) == rows.iloc[0]["chosen"] and decode(rejected) == rows.iloc[0]["rejected"]
    assert decode(chosen).endswith("<|im_end|>") and chosen != rejected
    assert request.request_id == "pref-00000" and request.prompt_ids.count(processor.image_token_id) == 1
    assert request.metadata["reference"] == rows.iloc[0]["reference"] and request.metadata["task"] == "digits"
    # the same prompt as load_prompts would build from the row
    assert request.prompt_ids == load_prompts(path, processor, cache_dir=str(tmp_path)).requests[0].prompt_ids
    # the limit is on prompt + the longer response
    total = [processor.expanded_length(r.prompt_ids, r.images) + max(len(c), len(j)) for r, c, j in result.requests]
    limit = sorted(total)[len(total) // 2]
    dropped = load_preferences(path, processor, LoadConfig(max_sequence_length=limit), cache_dir=str(tmp_path))
    assert dropped.counts["dropped_too_long"] == sum(t > limit for t in total) > 0
    assert all("longer response" in p for p in dropped.problems)


def test_preference_rows_bad_images_conversations_and_missing_columns(processor, tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    rows = [{"id": "text", "question": "2+2? /nothink", "image": "a.png", "chosen": "4", "rejected": "5<|im_end|>"},
            {"id": "chat", "question": "2+2? /nothink", "image": "a.png",
             "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "22"}]}]},
            {"id": "broken", "question": "2+2?", "image": "nope.png", "chosen": "4", "rejected": "5"}]
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = load_preferences(good, processor, cache_dir=str(tmp_path / "c1"))
    assert result.counts == {"rows": 3, "loaded": 2, "dropped_too_long": 0, "skipped_bad_image": 1}
    decode = processor.tokenizer.decode
    assert [(decode(c), decode(r)) for _, c, r in result.requests] == [("4<|im_end|>", "5<|im_end|>"),
                                                                      ("4<|im_end|>", "22<|im_end|>")]
    assert any("sample broken:" in p for p in result.problems)
    missing = tmp_path / "no_chosen.jsonl"
    missing.write_text(json.dumps({"id": "x", "question": "q", "answer": "4", "rejected": "5"}) + "\n")
    with pytest.raises(KeyError, match=r"no_chosen\.jsonl: sample x: preference rows need a non-empty 'chosen' column"):
        load_preferences(missing, processor, cache_dir=str(tmp_path / "c2"))
