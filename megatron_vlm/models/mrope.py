"""Multimodal rotary embeddings (M-RoPE) of the Qwen-VL families, and their 3-D position ids.

Each token has three positions (temporal, height, width); text tokens have three equal ones. The
rotary frequency channels are divided among the three by `mrope_section` ([t, h, w] channel counts
over head_dim / 2):
  contiguous (Qwen2-VL, Qwen2.5-VL): channels [0, t) use t, [t, t+h) use h, the rest use w;
  interleaved (Qwen3-VL): channel c uses h when c % 3 == 1 and c < 3h, w when c % 3 == 2 and
  c < 3w, else t (transformers' `recomposition_frequencies`).
megatron-core 0.16.1's `MultimodalRotaryEmbedding` only knows the contiguous layout, so this module
replaces it inside the GPTModel (same call signature). Position ids are always those of the full
sequence; under context parallelism the embedding is cut to this rank's chunks afterwards, in
megatron's load-balanced order, exactly like megatron's own rotary embeddings. A packed THD call
(`packed_call`) returns the whole pack's embedding instead: megatron's THD rotary path
(`_apply_rotary_pos_emb_thd`, given a table as long as the pack) cuts it per sample at the padded
boundaries, as the attention and the tokens are cut (`parallel.batching.thd_cp_index`).
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
from torch import nn


def mrope_channel_source(mrope_section: list[int], interleaved: bool) -> torch.Tensor:
    """For each of the head_dim/2 frequency channels, which position (0=t, 1=h, 2=w) drives it."""
    half = sum(mrope_section)
    source = torch.zeros(half, dtype=torch.long)
    if interleaved:
        for axis, offset in ((1, 1), (2, 2)):
            source[offset: mrope_section[axis] * 3: 3] = axis
    else:
        start = 0
        for axis, width in enumerate(mrope_section):
            source[start:start + width] = axis
            start += width
    return source


class MRotaryEmbedding(nn.Module):
    """position_ids [3, b, s_full] -> rotary embedding [s_local, b, 1, head_dim] for megatron."""

    def __init__(self, head_dim: int, rotary_base: float, mrope_section: list[int],
                 interleaved: bool, cp_group=None):
        super().__init__()
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("channel_source", mrope_channel_source(mrope_section, interleaved),
                             persistent=False)
        self.cp_group = cp_group
        self.packed = False  # inside packed_call: leave the CP cut to megatron's THD rotary path

    @contextmanager
    def packed_call(self, packed: bool):
        self.packed, before = packed, self.packed
        try:
            yield
        finally:
            self.packed = before

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        if position_ids.dim() == 2:  # text only: the same position on all three axes
            position_ids = position_ids[None].expand(3, -1, -1)
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)  # [3,b,s,d/2]
        index = self.channel_source.to(position_ids.device).view(1, 1, 1, -1)
        freqs = freqs.gather(0, index.expand(1, *freqs.shape[1:]))[0]  # [b, s, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [b, s, d] (non-interleaved rotate_half layout)
        emb = emb.transpose(0, 1)[:, :, None, :].contiguous()  # [s, b, 1, d]
        cp_group = cp_group or self.cp_group
        if cp_group is not None and cp_group.size() > 1 and not self.packed:
            from megatron.core.models.common.embeddings import rope_utils

            emb = rope_utils.get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb


def vision_position_ids(start: int, grid_thw, spatial_merge_size: int) -> torch.Tensor:
    """[3, n] positions of one image's merged tokens, starting at `start` (as transformers)."""
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // spatial_merge_size, w // spatial_merge_size
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(mm_token_type_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   spatial_merge_size: int, attention_mask: torch.Tensor | None = None):
    """3-D positions [3, b, s] and per-sample deltas [b, 1] (next position - length), for images.

    `mm_token_type_ids` marks text (0) and image (1) tokens; runs of image tokens consume the
    image grids in order. After an image the text position continues at start + max(h, w) / merge.
    Padding (attention_mask 0) gets position 0.
    """
    batch, seq = mm_token_type_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    grids = iter(image_grid_thw) if image_grid_thw is not None else iter(())
    deltas = []
    for b in range(batch):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(seq, dtype=torch.bool)
        types = mm_token_type_ids[b][keep].tolist()
        pieces, current = [], 0
        for kind, run in itertools.groupby(types):
            length = len(list(run))
            if kind == 0:
                pieces.append(torch.arange(length).expand(3, -1) + current)
                current += length
            elif kind == 1:
                grid = next(grids, None)
                if grid is None:
                    raise ValueError(f"sample {b}: more image-token runs than image grids")
                ids = vision_position_ids(current, grid, spatial_merge_size)
                if ids.shape[1] != length:
                    raise ValueError(f"sample {b}: an image run of {length} tokens does not match its "
                                     f"grid {tuple(int(x) for x in grid)} ({ids.shape[1]} tokens)")
                pieces.append(ids)
                current += max(int(grid[1]), int(grid[2])) // spatial_merge_size
            else:
                raise ValueError(f"mm_token_type_ids: only text (0) and image (1) are supported, got {kind}")
        full = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        positions[:, b, keep] = full
        deltas.append((full.max() + 1 - len(types)) if full.numel() else torch.tensor(0))
    return positions, torch.stack(deltas).view(batch, 1)
