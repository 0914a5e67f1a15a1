"""load_prompts: the demo's files and user files, with every dropped or skipped row counted."""
import json
import logging

import pandas as pd
import pytest
from datasets import Dataset, Features, Image, List, Value

from megatron_vlm.data.loading import (DataError, LoadConfig, MissingColumn, PromptTooLong, _utf8_text,
                                       check_prompt_counts, load_preferences, load_prompts, load_sft,
                                       load_sft_requests, require_rows)
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


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_text_that_is_not_utf8_names_the_file_and_the_byte_offset(processor, tmp_path):
    first = json.dumps({"question": "café?", "reference": "1"}).encode() + b"\n"  # é: valid, two bytes
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(first + b'{"question": "caf\xe9?", "reference": "1"}\n')
    offset = len(first) + len(b'{"question": "caf')
    for suffix in (".jsonl", ".json"):
        path = bad.rename(bad.with_suffix(suffix))
        with pytest.raises(DataError, match=rf"latin1\{suffix}: not UTF-8 text: byte 0xe9 at offset {offset} "
                                            rf"\(line 2\): invalid continuation byte"):
            load_prompts(path, processor, cache_dir=str(tmp_path / "c"))
        bad = path
    # read in chunks: a character cut by a chunk boundary is fine, the offset counts from the file start
    for chunk_bytes in (1, 2, 3, 7):
        with pytest.raises(DataError, match=f"at offset {offset} "):
            _utf8_text(bad, chunk_bytes)
    good = tmp_path / "good.jsonl"
    good.write_bytes(first * 3)
    assert all(_utf8_text(good, n) for n in (1, 2, 5)) and not _utf8_text(_jsonl(tmp_path / "e.jsonl", []))


def test_null_or_empty_question_names_the_file_row_and_column(processor, tmp_path):
    for value, what in ((None, "null"), ("  ", "empty")):
        path = _jsonl(tmp_path / f"q_{what}.jsonl", [{"question": "2+2?", "reference": "4"},
                                                     {"question": value, "reference": "1"}])
        for cfg in (LoadConfig(), LoadConfig(question_into_image=True)):  # a transform must not draw "None"
            with pytest.raises(MissingColumn, match=rf"q_{what}\.jsonl: sample q_{what}\.jsonl:1: column "
                                                    rf"'question' is {what}; .* \(row 1\)$"):
                load_prompts(path, processor, cfg, cache_dir=str(tmp_path / "c"))
    parquet = tmp_path / "q.parquet"
    pd.DataFrame({"id": ["a", "b"], "question": ["q", None], "reference": ["1", "2"]}).to_parquet(parquet)
    with pytest.raises(KeyError) as caught:  # still a KeyError, as a missing column always was
        load_prompts(parquet, processor, cache_dir=str(tmp_path / "c"))
    assert str(caught.value) == f"{parquet}: sample b: column 'question' is null; every row needs question " \
                                "text (row 1)"  # one line, without KeyError's quotes
    unreadable = tmp_path / "broken.jsonl"
    unreadable.write_text('{"question": "a", "reference": "1"}\n{"question": "b", "reference": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl: cannot be read as json: .*JSON parse error"):
        load_prompts(unreadable, processor, cache_dir=str(tmp_path / "c"))


def test_skipped_images_name_the_row_and_the_column(processor, tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    path = _jsonl(tmp_path / "img.jsonl", [{"id": "one", "question": "q", "image": "nope.png"},
                                           {"id": "two", "question": "q", "images": ["a.png", "gone.png"]},
                                           {"id": "ok", "question": "q", "image": "a.png"}])
    result = load_prompts(path, processor, cache_dir=str(tmp_path / "c"))
    assert result.counts["skipped_bad_image"] == 2 and [r.request_id for r in result.requests] == ["ok"]
    assert result.problems[0].startswith(f"{path}: skipped sample one: row 0, column 'image': cannot read image")
    assert result.problems[1].startswith(f"{path}: skipped sample two: row 1, column 'images': cannot read image")


def test_a_set_without_usable_rows_says_how_many_were_read_and_why_they_went(processor, tmp_path):
    path = _jsonl(tmp_path / "all_bad.jsonl", [{"id": f"r{i}", "question": "q", "image": "nope.png"}
                                               for i in range(3)])
    result = load_prompts(path, processor, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"all_bad\.jsonl: no usable prompt rows: 3 read, 3 removed \(3 "
                                        r"skipped_bad_image\); first problems: .*sample r0: .*sample r2: "):
        require_rows(result, path)
    long = load_prompts(demo_assets()["rl"], processor, LoadConfig(max_prompt_length=2), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"no usable prompt rows: 60 read, 60 removed \(60 dropped_too_long\)"):
        require_rows(long, "rl.parquet")
    empty = load_prompts(_jsonl(tmp_path / "empty.jsonl", []), processor, cache_dir=str(tmp_path / "c"))
    assert empty.counts["rows"] == 0
    with pytest.raises(DataError, match=r"empty\.jsonl: no eval rows \(the file holds none\)"):
        require_rows(empty, tmp_path / "empty.jsonl", "eval")


def test_prompt_counts_are_checked_before_the_run_starts(processor, tmp_path):
    prompts = load_prompts(_jsonl(tmp_path / "rl.jsonl", [{"question": f"{i}+1?", "reference": str(i + 1)}
                                                          for i in range(3)]), processor, cache_dir=str(tmp_path / "c"))
    evals = load_prompts(_jsonl(tmp_path / "eval.jsonl", [{"question": "1+1?", "reference": "2"}]), processor,
                         cache_dir=str(tmp_path / "c"))
    empty = load_prompts(_jsonl(tmp_path / "none.jsonl", []), processor, cache_dir=str(tmp_path / "c"))
    check_prompt_counts(prompts, evals, 3, prompt_source="rl.jsonl", eval_source="eval.jsonl")
    with pytest.raises(DataError, match=r"rl\.jsonl: 3 usable prompts, fewer than rollout\.prompts_per_step=4"):
        check_prompt_counts(prompts, evals, 4, prompt_source="rl.jsonl")
    with pytest.raises(DataError, match=r"eval\.jsonl: no eval rows"):
        check_prompt_counts(prompts, empty, 3, eval_source="eval.jsonl")
    with pytest.raises(DataError, match=r"rl\.jsonl: no prompt rows"):
        check_prompt_counts(empty, evals, 3, prompt_source="rl.jsonl")
    with pytest.raises(DataError, match=r"sft\.parquet: no sft rows"):
        check_prompt_counts(prompts, evals, 3, sft=empty, sft_source="sft.parquet")


def test_sft_requests_carry_the_target_and_a_row_without_one_is_named(processor, tmp_path):
    path = demo_assets()["sft"]
    rows = pd.read_parquet(path)
    result = load_sft_requests(path, processor, cache_dir=str(tmp_path))
    assert result.counts["loaded"] == 30 and result.requests[0].metadata["response"] == rows.iloc[0]["response"]
    prompts = load_prompts(path, processor, cache_dir=str(tmp_path))
    assert result.requests[0].prompt_ids == prompts.requests[0].prompt_ids
    answers = _jsonl(tmp_path / "answers.jsonl", [{"question": "2+2? /nothink", "answer": "4"}])
    assert load_sft_requests(answers, processor, cache_dir=str(tmp_path / "c")).requests[0].metadata["response"] \
        == "4<|im_end|>"
    gap = _jsonl(tmp_path / "gap.jsonl", [{"id": "a", "question": "q", "response": "1<|im_end|>"},
                                          {"id": "b", "question": "q"}])
    with pytest.raises(MissingColumn, match=r"gap\.jsonl: sample b: SFT rows need a 'response' or an 'answer' "
                                            r"column \(column 'response' is null and there is no 'answer'\) \(row 1\)"):
        load_sft_requests(gap, processor, cache_dir=str(tmp_path / "c"))
    prompts_only = _jsonl(tmp_path / "prompts.jsonl", [{"id": "p", "question": "q", "reference": "1"}])
    with pytest.raises(MissingColumn, match=r"sample p: SFT rows need a 'response' or an 'answer' column \(got "
                                            r"columns \['id', 'question', 'reference'\]\)"):
        load_sft_requests(prompts_only, processor, cache_dir=str(tmp_path / "c"))


def test_preference_rows_with_a_null_response_name_the_row(processor, tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"id": "x", "question": "q", "chosen": "4", "rejected": "5"},
                                             {"id": "y", "question": "q", "chosen": "4", "rejected": None}])
    with pytest.raises(MissingColumn, match=r"pairs\.jsonl: sample y: preference rows need a non-empty "
                                            r"'rejected' column \('rejected' is null\) \(row 1\)"):
        load_preferences(path, processor, cache_dir=str(tmp_path / "c"))
