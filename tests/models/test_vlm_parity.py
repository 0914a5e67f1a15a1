"""Our megatron VLMs give transformers' logits, and their HF weight stream gives its weights back.

One 4-rank launch per family checks several layouts (vlm_parity_worker.py). fp32 tolerance 1e-5
(the issue's bound); measured differences are ~2e-7 (a few ulps of logits ~0.6) or exactly 0.
"""
import json
import os

import pytest
import torch

from megatron_vlm.models import family_for, supported_architectures
from megatron_vlm.models.mrope import get_rope_index
from megatron_vlm.parallel.launch import launch_local
from tests.models.vlm_fixtures import make_config, make_hf_model, make_inputs

WORKER = os.path.join(os.path.dirname(__file__), "vlm_parity_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHES = {
    "qwen3_vl_moe": ["tp1", "tp2_ep2", "tp2_ep2_etp2", "tp2_ep2_etp2_te", "pp2", "cp2", "cp2_tp2"],
    "qwen3_vl": ["tp1", "tp2", "pp2", "cp2"],
    "qwen2_5_vl": ["tp1", "tp2", "pp2", "cp2"],
}


@pytest.mark.dist
@pytest.mark.parametrize("family", list(LAUNCHES))
def test_logits_and_weights_match_transformers(family, tmp_path):
    from megatron_vlm.checkpoint.convert import hf_to_mcore
    from megatron_vlm.parallel.config import ParallelConfig
    from tests.checkpoint.test_convert import write_hub_checkpoint

    # Sharded layouts are also loaded from `convert hf-to-mcore` output (load_into_model).
    hub = write_hub_checkpoint(make_hf_model(family), tmp_path / "hub")
    converted = {"tp2_ep2": dict(tp=2, ep=2, etp=1), "pp2": dict(pp=2), "tp2": dict(tp=2)}
    for layout in set(LAUNCHES[family]) & set(converted):
        hf_to_mcore(str(hub), str(tmp_path / "ckpt" / layout), ParallelConfig(**converted[layout]))
    out = tmp_path / "parity.json"
    result = launch_local([WORKER, str(out), family, ",".join(LAUNCHES[family]),
                           str(tmp_path / "ckpt")], nproc=4, timeout=420, env={"PYTHONPATH": ROOT})
    assert result.ok, result.summary()
    report = json.loads(out.read_text())
    print(family, json.dumps(report))
    for layout in LAUNCHES[family]:
        r = report[layout]
        assert r["logits_max_abs"] <= 1e-5, (layout, r)
        assert r["weights_mismatched"] == 0 and r["key_count_differs"] == 0, (layout, r)
        assert r["params_changed_by_export"] == 0, (layout, r)
        if layout in converted:
            assert r["checkpoint_logits_max_abs"] <= 1e-5, (layout, r)


@pytest.mark.parametrize("family", list(LAUNCHES))
def test_rope_index_equals_transformers(family):
    hf = make_hf_model(family)
    layouts = [((6, (4, 6), 5), (3, (4, 4), 4, (4, 8), 2)),  # multi-image, non-square grids
               ((12,), (2, (8, 4), 1))]                       # text-only sample in the batch
    for layout in layouts:
        inputs = make_inputs(layout)
        mask = torch.ones_like(inputs["input_ids"])
        mask[0, -3:] = 0  # padding at the end of one sample
        for attention_mask in (None, mask):
            theirs, their_deltas = hf.model.get_rope_index(
                inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                attention_mask=attention_mask)
            ours, deltas = get_rope_index(inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                          hf.config.vision_config.spatial_merge_size, attention_mask)
            assert torch.equal(ours, theirs)
            assert torch.equal(deltas.flatten(), their_deltas.flatten().to(deltas.dtype))


def test_unknown_architecture_lists_the_supported_ones():
    config = make_config("qwen3_vl")
    config.architectures = ["LlavaForConditionalGeneration"]
    with pytest.raises(ValueError, match="Qwen3VLMoeForConditionalGeneration") as err:
        family_for(config)
    assert "LlavaForConditionalGeneration" in str(err.value)
    assert len(supported_architectures()) == 3


def test_image_token_count_must_match_the_images(single_rank_runtime):
    from megatron_vlm.parallel.config import ParallelConfig

    hf = make_hf_model("qwen3_vl")
    model = family_for(hf.config).build(hf.config, ParallelConfig(), "cpu")
    inputs = make_inputs()
    position_ids, _ = get_rope_index(inputs["mm_token_type_ids"], inputs["image_grid_thw"], 2)
    input_ids = inputs["input_ids"].clone()
    first_image_token = (input_ids == 190).nonzero()[0]
    input_ids[tuple(first_image_token)] = 5  # one image placeholder lost (e.g. a bad truncation)
    with pytest.raises(ValueError, match="17 image tokens in input_ids but the images give 18 features"):
        model(input_ids, position_ids, pixel_values=inputs["pixel_values"],
              image_grid_thw=inputs["image_grid_thw"])
