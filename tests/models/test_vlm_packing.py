"""Packed (THD) sequences with images give the same logits as each sample alone, M-RoPE included."""
import torch

from megatron_vlm.models import family_for
from megatron_vlm.models.mrope import get_rope_index
from megatron_vlm.parallel.config import ParallelConfig
from tests.models.vlm_fixtures import make_hf_model, make_inputs


def test_packed_samples_equal_separate_samples(single_rank_runtime):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
    from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict

    hf = make_hf_model("qwen3_vl_moe")
    family = family_for(hf.config)
    model = family.build(hf.config, ParallelConfig(), "cpu").eval()
    full = dict(hf_to_mcore(family.hf_rules(hf.config), hf.state_dict().__getitem__))
    load_full_state_dict(model, full, RankLayout.current(model.config))
    samples = [make_inputs(((3, (4, 6), 5),), seed=1), make_inputs(((2, (4, 4), 1, (8, 4), 3),), seed=2)]
    separate, ids, positions, pixels, grids = [], [], [], [], []
    with torch.no_grad():
        for s in samples:
            pos, _ = get_rope_index(s["mm_token_type_ids"], s["image_grid_thw"], 2)
            separate.append(model(s["input_ids"], pos, pixel_values=s["pixel_values"],
                                  image_grid_thw=s["image_grid_thw"])[0])
            ids.append(s["input_ids"][0]), positions.append(pos[:, 0])
            pixels.append(s["pixel_values"]), grids.append(s["image_grid_thw"])
        lengths = [len(x) for x in ids]
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        packed_params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                        max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
        packed = model(torch.cat(ids)[None], torch.cat(positions, dim=1)[:, None],
                       pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids),
                       packed_seq_params=packed_params)[0]
    expected = torch.cat(separate)
    # Positions restart per sample and jump after each image; a packed path that indexed rotary
    # frequencies by offset within the pack (or re-used sample 0's) would differ by O(1).
    assert (packed - expected).abs().max() < 1e-5
