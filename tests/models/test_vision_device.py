"""The vision tower and the M-RoPE table are built on the rank's device in the run's dtype.

`meta` stands in for the GPU: a tower built there has every parameter and buffer there (a tower
built on the host and left there would not). The dtype is the model config's `params_dtype`, for
parameters and buffers alike, except what transformers itself keeps in fp32 (the rotary inv_freq).
"""
import pytest
import torch

from megatron_vlm.models import family_for, vlm
from megatron_vlm.parallel.config import ParallelConfig
from tests.models.vlm_fixtures import make_config

META = torch.device("meta")
FAMILIES = ("qwen3_vl_moe", "qwen3_vl", "qwen2_5_vl")


def _check_tower(tower, device: torch.device, dtype: torch.dtype) -> None:
    assert all(p.device == device and p.dtype == dtype for p in tower.parameters())
    buffers = dict(tower.named_buffers())
    assert any(name.endswith("inv_freq") for name in buffers)
    for name, buffer in buffers.items():
        assert buffer.device == device, name
        if name.endswith("inv_freq"):  # as transformers keeps it, whatever the model's dtype
            assert buffer.dtype == torch.float32, name
        elif buffer.is_floating_point():
            assert buffer.dtype == dtype, name


@pytest.mark.parametrize("family_name", FAMILIES)
def test_vision_tower_is_built_on_the_given_device_in_the_given_dtype(family_name):
    hf_config = make_config(family_name)
    before = hf_config.vision_config.to_dict()
    tower = family_for(hf_config).vision_spec(hf_config).build_vision(META, torch.bfloat16)
    _check_tower(tower, META, torch.bfloat16)
    assert hf_config.vision_config.to_dict() == before  # the shared HF config is not rewritten


def test_vlm_builds_its_vision_tower_and_mrope_on_the_rank_device(monkeypatch, single_rank_runtime):
    monkeypatch.setattr(vlm, "build_device", lambda device_type: META)  # as "cuda" would give the GPU
    hf_config = make_config("qwen3_vl_moe")
    model = family_for(hf_config).build(hf_config, ParallelConfig(), "cpu", torch.bfloat16)
    _check_tower(model.vision, META, torch.bfloat16)
    assert all(b.device == META for b in model.language.rotary_pos_emb.buffers())
    assert model.language.rotary_pos_emb.inv_freq.dtype == torch.float32


def test_bf16_vlm_on_the_host_runs_with_a_bf16_vision_tower(single_rank_runtime):
    from megatron_vlm.models.mrope import get_rope_index
    from tests.models.vlm_fixtures import make_inputs

    hf_config = make_config("qwen3_vl_moe")
    torch.manual_seed(0)
    model = family_for(hf_config).build(hf_config, ParallelConfig(), "cpu", torch.bfloat16).eval()
    _check_tower(model.vision, torch.device("cpu"), torch.bfloat16)
    inputs = make_inputs(((3, (4, 6), 5),), seed=1)
    positions, _ = get_rope_index(inputs["mm_token_type_ids"], inputs["image_grid_thw"], 2)
    with torch.no_grad():  # fp32 pixels from the processor meet the bf16 tower
        logits = model(inputs["input_ids"], positions, pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=inputs["mm_token_type_ids"])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
