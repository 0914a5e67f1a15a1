"""Tiny random Qwen-VL models built from config objects, and image + text inputs for them.

Sizes are chosen so that a missing transpose or a wrong split cannot pass silently: the MoE
intermediate size (48) and its doubled fc1 (96) differ from the hidden size (64), there are more
attention heads than key/value heads, and images have non-square grids.
"""
import torch

IMAGE, VIDEO, VSTART, VEND = 190, 191, 192, 193
VOCAB = 200


def text_config(moe: bool, interleaved: bool = True, **extra):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
               max_position_embeddings=512,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3], "mrope_interleaved": interleaved})
    if moe:
        cfg.update(moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                   decoder_sparse_step=1, mlp_only_layers=[0])
    cfg.update(extra)
    return cfg


def qwen3_vision_config():
    return dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                num_position_embeddings=16, deepstack_visual_indexes=[0, 2])


def make_config(family: str, tie: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
               vision_end_token_id=VEND, tie_word_embeddings=tie)
    if family == "qwen3_vl_moe":
        cfg = Qwen3VLMoeConfig(text_config=text_config(True), vision_config=qwen3_vision_config(), **ids)
        cfg.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    elif family == "qwen3_vl":
        cfg = Qwen3VLConfig(text_config=text_config(False), vision_config=qwen3_vision_config(), **ids)
        cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    elif family == "qwen2_5_vl":
        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1, 3], in_chans=3)
        cfg = Qwen2_5_VLConfig(text_config=text_config(False, interleaved=False), vision_config=vision, **ids)
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    else:
        raise ValueError(family)
    return cfg


def make_hf_model(family: str, seed: int = 0, tie: bool = False):
    from megatron_vlm.models import family_for

    cfg = make_config(family, tie)
    torch.manual_seed(seed)
    model = family_for(cfg).hf_model_class(cfg).eval()
    with torch.no_grad():  # norms start at 1 / 0: perturb them so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_inputs(batch_layout=((6, (4, 6), 5), (3, (4, 4), 4, (4, 8), 2)), seed: int = 1,
                patch_dim: int = 3 * 2 * 4 * 4, merge: int = 2):
    """Token ids, mm_token_type_ids, pixel_values and image_grid_thw for samples made of
    text runs (ints: lengths) and images (tuples: (h, w) in patches). All samples padded to the
    same length with text so that every batch row has equal length."""
    g = torch.Generator().manual_seed(seed)
    rows, types, grids = [], [], []
    for sample in batch_layout:
        ids, kind = [], []
        for piece in sample:
            if isinstance(piece, int):
                ids += torch.randint(0, 180, (piece,), generator=g).tolist()
                kind += [0] * piece
            else:
                h, w = piece
                n = h * w // merge**2
                ids += [VSTART] + [IMAGE] * n + [VEND]
                kind += [0] + [1] * n + [0]
                grids.append([1, h, w])
        rows.append(ids)
        types.append(kind)
    length = max(len(r) for r in rows)
    length += (-length) % 8  # divisible by 2*CP for CP up to 4
    for ids, kind in zip(rows, types):
        pad = length - len(ids)
        ids += torch.randint(0, 180, (pad,), generator=g).tolist()
        kind += [0] * pad
    grid = torch.tensor(grids)
    pixel_values = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
    return dict(input_ids=torch.tensor(rows), mm_token_type_ids=torch.tensor(types),
                pixel_values=pixel_values, image_grid_thw=grid)


def mark_experts_as_transformer_engine_does(model: torch.nn.Module) -> int:
    """Set `partition_dim=0` on every expert weight, as TE's expert linears carry it when megatron
    builds them with `parallel_mode=None` (EP > 1 or expert TP > 1). Returns the fc2s marked."""
    marked = 0
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            param.tensor_model_parallel, param.partition_dim = True, 0
            marked += name.endswith("linear_fc2.weight")
    return marked
