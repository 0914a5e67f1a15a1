"""The digits task: exact answers, held-out digit samples, determinism, and the demo assets."""
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, Qwen3VLMoeForConditionalGeneration

from megatron_vlm.data.digits import (CONFUSIONS, QUESTIONS, DigitsConfig, answer, build_splits, load_digit_samples,
                                      main, render_pair, split_samples, thinking)
from megatron_vlm.data.processor import MultimodalProcessor
from megatron_vlm.data.templates import TemplateConfig, is_well_formed, render_prompt, render_response
from megatron_vlm.rewards.registry import get_verifier
from tests.data.digits_fixtures import SMALL, demo_assets


def test_answers_and_images_come_from_the_real_digits():
    images, labels = load_digit_samples()
    assert images.shape == (1797, 8, 8) and images.max() == 16 and set(labels.tolist()) == set(range(10))
    assert [answer(kind, 3, 7) for kind in QUESTIONS] == [10, 7, -4]
    pair = np.asarray(render_pair(images[0], images[1], scale=2).convert("L"))
    assert pair.shape == (16, 32)
    assert np.array_equal(pair[::2, ::2], np.round(255 * (1 - np.concatenate([images[0], images[1]], 1) / 16)))


def test_held_out_samples_never_appear_in_training_images():
    _, labels = load_digit_samples()
    train, held_out = split_samples(labels, 0.2, seed=3)
    assert not set(train) & set(held_out) and len(train) + len(held_out) == 1797
    for label in range(10):  # stratified: every label is held out in proportion
        share = np.isin(np.flatnonzero(labels == label), held_out).mean()
        assert 0.15 < share < 0.25
    rows = build_splits(DigitsConfig(seed=3, **SMALL))
    used = {name: {i for row in split for i in row["source_ids"]} for name, split in rows.items()}
    assert used["eval"] <= set(held_out) and used["rl"] | used["sft"] | used["pref"] | used["rl_text"] <= set(train)


def test_same_seed_same_data_other_seed_other_data():
    first, again, other = (build_splits(DigitsConfig(seed=s, **SMALL)) for s in (0, 0, 1))
    key = lambda rows: [(r["id"], r["source_ids"], r["kind"], r.get("reference", r.get("answer"))) for r in rows]
    for name in first:
        assert key(first[name]) == key(again[name])
        assert [r["image"].tobytes() for r in first[name] if "image" in r] == \
            [r["image"].tobytes() for r in again[name] if "image" in r]
    assert key(first["rl"]) != key(other["rl"])


def test_sft_targets_and_rl_references_verify():
    numeric = get_verifier("numeric")
    rows = build_splits(DigitsConfig(seed=0, **SMALL))
    for row in rows["sft"]:
        assert is_well_formed(row["response"], "think")
        assert numeric(row["response"], row["answer"], {}) == 1.0
        assert row["answer"] == str(answer(row["kind"], row["left"], row["right"]))
    assert {row["kind"] for row in rows["rl"]} == set(QUESTIONS)
    for row in rows["rl"] + rows["eval"]:
        assert set(row) >= {"reference", "task", "verifier"} and "answer" not in row and "thinking" not in row
        assert numeric(f"<think>\nx\n</think>\n\n{row['reference']}", row["reference"], {}) == 1.0
        assert numeric(f"<think>\nx\n</think>\n\n{int(row['reference']) + 1}", row["reference"], {}) == 0.0


@pytest.mark.parametrize("mode", ["think", "nothink"])
def test_preference_pairs_reject_a_plausible_mistake(mode):
    numeric = get_verifier("numeric")
    rows = build_splits(DigitsConfig(seed=0, mode=mode, **SMALL))
    pairs, sft = rows["pref"], rows["sft"]
    assert len(pairs) == SMALL["num_pref"] and {row["kind"] for row in pairs} == set(QUESTIONS)
    assert set(pairs[0]) >= set(rows["rl"][0]) | {"chosen", "rejected", "error"}  # same prompt columns as RL
    assert {row["error"] for row in pairs} == {"misread_left", "misread_right", "slip"}
    for row in pairs:
        assert row["chosen"] != row["rejected"]
        assert is_well_formed(row["chosen"], mode) and is_well_formed(row["rejected"], mode)
        assert numeric(row["chosen"], row["reference"], {}) == 1.0
        assert numeric(row["rejected"], row["reference"], {}) == 0.0  # the mistake reaches the answer
        assert row["reference"] == str(answer(row["kind"], row["left"], row["right"]))
        if mode == "think":
            head = row["rejected"].split(".")[0]  # "<think>\nLeft a, right b"
            left, right = (int(part.split()[-1]) for part in head.split(","))
            if row["error"] == "misread_left":
                assert left in CONFUSIONS[row["left"]] and right == row["right"]
            elif row["error"] == "misread_right":
                assert right in CONFUSIONS[row["right"]] and left == row["left"]
            else:
                assert (left, right) == (row["left"], row["right"])
        # chosen is the target the SFT rows teach
        trace = thinking(row["kind"], row["left"], row["right"]) if mode == "think" else None
        assert row["chosen"] == render_response(row["reference"], trace, mode)
    assert sft[0]["response"] == render_response(sft[0]["answer"], sft[0]["thinking"] or None, mode)


def test_demo_assets_build_a_trainable_model():
    paths = demo_assets()
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["counts"] == {"sft": 30, "rl": 60, "eval": 30, "pref": 24, "rl_text": 12}
    text = pd.read_parquet(paths["rl_text"])
    assert "image" not in text.columns and set(text["task"]) == {"arith"}
    for _, row in text.iterrows():  # the question states the digits; the reference answers it
        numbers = [int(t) for t in row["question"].rstrip("?").replace("-", " ").split() if t.isdigit()]
        expected = {"sum": sum, "max": max, "difference": lambda n: n[0] - n[1]}[row["kind"]](numbers)
        assert int(row["reference"]) == expected
    assert manifest["vision_tokens_per_image"] == 8 and manifest["image_size"] == [16, 32]
    assert 1_000_000 <= manifest["parameters"] <= 3_000_000
    for name in ("sft", "rl", "eval", "pref"):
        assert len(pd.read_parquet(paths[name])) == manifest["counts"][name]
    config = AutoConfig.from_pretrained(paths["model"])
    processor = MultimodalProcessor.from_pretrained(paths["model"])
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.image_token_id == processor.image_token_id
    assert config.text_config.moe_intermediate_size != config.text_config.hidden_size
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"]
    row = pd.read_parquet(paths["eval"]).iloc[0]
    image = Image.open(io.BytesIO(row["image"]["bytes"]))
    text = render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}],
                         TemplateConfig())
    inputs = processor(processor.tokenizer(text, add_special_tokens=False).input_ids, [image])
    assert manifest["rl_prompt_length"]["min"] <= inputs["input_ids"].shape[1] <= manifest["rl_prompt_length"]["max"]
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_cli_writes_the_same_files_for_the_same_seed(tmp_path, capsys):
    main([str(tmp_path / "a"), "--seed", "0", "--num-sft", "30", "--num-rl", "60", "--num-eval", "30",
          "--num-pref", "24", "--num-text", "12"])
    assert '"vision_tokens_per_image": 8' in capsys.readouterr().out
    for name in ("sft", "rl", "eval", "pref", "rl_text"):
        assert pd.read_parquet(tmp_path / "a" / f"{name}.parquet").equals(pd.read_parquet(demo_assets()[name]))
    with pytest.raises(ValueError, match="digits.held_out_fraction must be in"):
        DigitsConfig(held_out_fraction=1.0)


def test_the_project_builds_its_megatron_model_from_the_demo_config(single_rank_runtime):
    from megatron_vlm.models import family_for
    from megatron_vlm.models.mrope import get_rope_index
    from megatron_vlm.parallel.config import ParallelConfig

    paths = demo_assets()
    config = AutoConfig.from_pretrained(paths["model"])
    model = family_for(config).build(config, ParallelConfig(), "cpu")
    assert sum(p.numel() for p in model.parameters()) == json.loads(paths["manifest"].read_text())["parameters"]
    processor = MultimodalProcessor.from_pretrained(paths["model"])
    row = pd.read_parquet(paths["rl"]).iloc[0]
    text = render_prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}],
                         TemplateConfig())
    inputs = processor(processor.tokenizer(text, add_special_tokens=False).input_ids,
                       [Image.open(io.BytesIO(row["image"]["bytes"]))])
    position_ids, _ = get_rope_index(inputs["mm_token_type_ids"], inputs["image_grid_thw"], 2)
    with torch.no_grad():
        logits = model(inputs["input_ids"], position_ids, pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"])
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer)) and torch.isfinite(logits).all()
