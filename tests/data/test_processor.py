"""The tiny-patch Qwen3-VL processor and the MultimodalProcessor wrapper, through a real HF model."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from megatron_vlm.data.processor import MultimodalProcessor, VisionPatchConfig, save_processor
from megatron_vlm.data.templates import TemplateConfig, render_prompt
from megatron_vlm.data.tokenizer import build_char_tokenizer, token_ids

VISION = VisionPatchConfig()  # patch 4, merge 2, temporal 2


def image(height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return save_processor(tmp_path_factory.mktemp("processor"), build_char_tokenizer(), VISION)


@pytest.fixture(scope="module")
def processor(saved_dir):
    return MultimodalProcessor.from_pretrained(saved_dir)


def prompt_ids(processor, n_images, text="What is the sum of the two digits?"):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    rendered = render_prompt([{"role": "user", "content": content}], TemplateConfig(), "nothink")
    return processor.tokenizer(rendered, add_special_tokens=False).input_ids


def tiny_model(tokenizer):
    ids = token_ids(tokenizer)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=48, num_experts=4,
                num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=VISION.patch_size, spatial_merge_size=VISION.merge_size,
                  temporal_patch_size=VISION.temporal_patch_size, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["image_token_id"],
                              video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
                              vision_end_token_id=ids["vision_end_token_id"])
    torch.manual_seed(0)
    return Qwen3VLMoeForConditionalGeneration(config).eval()


def test_saved_files_load_with_auto_classes(saved_dir):
    tokenizer, image_processor = AutoTokenizer.from_pretrained(saved_dir), AutoImageProcessor.from_pretrained(saved_dir)
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (4, 2, 2)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == token_ids(tokenizer)["image_token_id"]
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                 "tokenizer.json", "chat_template.jinja"):
        assert (saved_dir / name).exists(), name


def test_placeholders_expand_to_grid_tokens_and_the_model_runs(processor):
    images = [image(16, 32), image(24, 16, seed=1)]          # grids 4 x 8 and 6 x 4 patches
    ids = prompt_ids(processor, 2)
    inputs = processor(ids, images)
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8], [1, 6, 4]]
    per_image = processor.tokens_per_image(grid)
    assert per_image == [8, 6]
    image_id = processor.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == sum(per_image) == int(grid.prod(-1).sum()) // 4
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_id).long())
    assert inputs["input_ids"].shape[1] == len(ids) + sum(per_image) - 2 == processor.expanded_length(ids, images)
    assert inputs["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 4 * 4)
    model = tiny_model(processor.tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_sizes_are_bounded_and_mismatches_raise(processor):
    assert processor.tokens_per_image(processor.process_images([image(8, 8)])["image_grid_thw"]) == [4]   # min_pixels
    big = processor.process_images([image(200, 300)])["image_grid_thw"]
    assert processor.tokens_per_image(big)[0] <= VISION.max_pixels // 64
    assert processor.expanded_length(prompt_ids(processor, 1), [image(200, 300)]) == \
        processor(prompt_ids(processor, 1), [image(200, 300)])["input_ids"].shape[1]
    text_only = processor(prompt_ids(processor, 0), [])
    assert "pixel_values" not in text_only and text_only["mm_token_type_ids"].sum() == 0
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        processor(prompt_ids(processor, 2), [image(16, 32)])


def test_same_as_qwen3vl_processor_where_torchvision_exists(saved_dir, processor):
    pytest.importorskip("torchvision")  # transformers builds Qwen3VLProcessor only with torchvision
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(saved_dir)
    assert type(hf).__name__ == "Qwen3VLProcessor"
    images = [image(16, 32), image(24, 16, seed=1)]
    text = processor.tokenizer.decode(prompt_ids(processor, 2))
    expected = hf(text=[text], images=images, return_tensors="pt")
    got = processor(prompt_ids(processor, 2), images)
    for key in ("input_ids", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(expected[key], got[key]), key
    torch.testing.assert_close(expected["pixel_values"], got["pixel_values"])
