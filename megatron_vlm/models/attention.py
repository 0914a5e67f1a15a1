"""Core attention for the CPU layer spec: causal GQA in plain torch, with context parallelism and
packed (THD) sequences.

megatron-core's own non-TE `DotProductAttention` refuses context parallelism and packed sequences
(transformer/dot_product_attention.py); on GPU, Transformer Engine's attention does both. This
module fills the same slot (`SelfAttentionSubmodules.core_attention`, same constructor and forward
signature) on CPU.

Context parallelism: megatron splits a sequence of length S into 2*CP chunks and gives CP rank r the
chunks r and 2*CP-1-r (load balancing for the causal mask; the rotary embedding is split the same
way). Here each rank all-gathers K and V over the CP group, restores the natural chunk order, and
masks with the global positions of its own query chunks. The backward of the gather sums the K/V
gradients of every rank and keeps this rank's chunks. A packed THD sequence under CP is cut the way
Transformer Engine cuts it: each sample's padded span (a multiple of 2*CP) into 2*CP chunks, rank r
keeping chunks r and 2*CP-1-r of every sample (`parallel.batching.thd_cp_index`); the gather
restores the pack's order and each sample's queries see that sample's keys only. Memory is O(S)
per rank for K/V, which is fine for the CPU path; the GPU path uses TE's ring attention.
"""
from __future__ import annotations

import math

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule

from megatron_vlm.parallel.batching import thd_cp_index


def cp_local_positions(seq_len_local: int, cp_size: int, cp_rank: int, device) -> torch.Tensor:
    """Global token positions of this CP rank's local tokens of one unpacked sequence (two chunks)."""
    chunk = seq_len_local // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


class _GatherOverCP(torch.autograd.Function):
    """[s_local, ...] on each CP rank -> [s_global, ...] in natural order, where `positions[r]` are
    the global positions of rank r's local tokens; the backward sums the gradients of every rank
    and keeps this rank's positions."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, positions: list) -> torch.Tensor:
        ctx.group, ctx.mine = group, positions[group.rank()]
        pieces = [torch.empty_like(local) for _ in range(group.size())]
        torch.distributed.all_gather(pieces, local.contiguous(), group=group)
        full = local.new_empty((sum(len(p) for p in positions), *local.shape[1:]))
        for piece, where in zip(pieces, positions):
            full[where] = piece
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[ctx.mine], None, None


class CoreAttention(MegatronModule):
    """Drop-in for megatron's DotProductAttention: q [sq, b, np, hn], k/v [sk, b, ng, hn] ->
    [sq, b, np*hn]; causal; GQA by repeating K/V heads; packed sequences via cu_seqlens."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("CoreAttention: attention_bias is not supported")
        if query.dim() == 3:  # THD: megatron squeezes the batch dim of packed sequences
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        sq = query.shape[0]
        if packed_seq_params is not None and attention_mask is None and query.shape[1] == 1:
            if cp_size == 1:
                return self._packed(query, key, value, packed_seq_params.cu_seqlens_q)
            return self._packed_cp(query, key, value, packed_seq_params)
        if cp_size > 1:
            if packed_seq_params is not None or attention_mask is not None:
                raise ValueError("CoreAttention: CP on CPU takes unpacked causal sequences or one "
                                 "packed THD sequence")
            positions = [cp_local_positions(sq, cp_size, r, query.device) for r in range(cp_size)]
            key = _GatherOverCP.apply(key, self.cp_group, positions)
            value = _GatherOverCP.apply(value, self.cp_group, positions)
            q_pos = positions[self.cp_group.rank()]
        else:
            q_pos = torch.arange(sq, device=query.device)
        k_pos = torch.arange(key.shape[0], device=query.device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # [sq, sk]
        if packed_seq_params is not None:
            segment = _segment_ids(packed_seq_params.cu_seqlens_q, key.shape[0], query.device)
            allowed = allowed & (segment[q_pos][:, None] == segment[None, :])
        mask = allowed[None, None]
        if attention_mask is not None:  # megatron convention: True = masked out
            mask = mask & ~attention_mask
        groups = query.shape[2] // key.shape[2]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.repeat_interleave(groups, dim=2).permute(1, 2, 0, 3)
        v = value.repeat_interleave(groups, dim=2).permute(1, 2, 0, 3)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
        )  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, query.shape[1], -1)


    def _packed(self, query, key, value, cu_seqlens):
        """THD attention as one batched call over the samples of the pack, each padded to the
        longest: O(sum of L^2) work instead of the dense [T, T] mask's O(T^2). Tail padding
        after the last sample is one-token segments (each attends to itself), as with the mask."""
        total, device = query.shape[0], query.device
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        lengths = torch.cat([cu[1:] - cu[:-1], torch.ones(total - int(cu[-1]), dtype=torch.long, device=device)])
        starts = torch.cat([cu[:-1], torch.arange(int(cu[-1]), total, device=device)])
        width = int(lengths.max())
        offsets = torch.arange(width, device=device)
        valid = offsets[None, :] < lengths[:, None]                        # [n, L]
        index = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # [n, L] -> token
        groups = query.shape[2] // key.shape[2]
        q = query[:, 0][index].permute(0, 2, 1, 3)                          # [n, np, L, hn]
        k = key[:, 0].repeat_interleave(groups, dim=1)[index].permute(0, 2, 1, 3)
        v = value[:, 0].repeat_interleave(groups, dim=1)[index].permute(0, 2, 1, 3)
        causal = offsets[None, :] <= offsets[:, None]                       # [L, L]
        mask = (causal[None] & valid[:, None, :])[:, None]                  # [n, 1, L, L]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale)                                       # [n, np, L, hn]
        out = out.permute(0, 2, 1, 3)[valid]                                # [T, np, hn] in order
        return out.reshape(total, 1, -1)


    def _packed_cp(self, query, key, value, params):
        """THD attention under CP: this rank holds chunks r and 2cp-1-r of every sample
        (`parallel.batching.thd_cp_index` on cu_seqlens_q_padded); K and V are gathered over the
        CP group into the pack's natural order, and each sample's local queries attend causally
        to that sample's keys by global position, one batched call over the samples as in
        `_packed`. Padding inside a sample's padded span sits after its real tokens, so a real
        query never sees it."""
        device, cp_size, cp_rank = query.device, self.cp_group.size(), self.cp_group.rank()
        cu = packed_seq_params_padded(params)
        positions = [thd_cp_index(cu, cp_size, r).to(device) for r in range(cp_size)]
        key = _GatherOverCP.apply(key[:, 0], self.cp_group, positions)      # [T, ng, hn]
        value = _GatherOverCP.apply(value[:, 0], self.cp_group, positions)
        cu = cu.to(device=device, dtype=torch.long)
        spans = cu[1:] - cu[:-1]                                            # padded sample lengths
        width_k, width_q = int(spans.max()), int(spans.max()) // cp_size
        offsets_k, offsets_q = torch.arange(width_k, device=device), torch.arange(width_q, device=device)
        valid_k = offsets_k[None, :] < spans[:, None]                       # [n, Lk]
        valid_q = offsets_q[None, :] < (spans // cp_size)[:, None]          # [n, Lq]
        k_index = torch.where(valid_k, cu[:-1, None] + offsets_k[None, :], 0)
        q_index = torch.where(valid_q, cu[:-1, None] // cp_size + offsets_q[None, :], 0)
        q_pos = torch.where(valid_q, positions[cp_rank][q_index], cu[-1])   # padding rows see all
        groups = query.shape[2] // key.shape[1]
        q = query[:, 0][q_index].permute(0, 2, 1, 3)                        # [n, np, Lq, hn]
        k = key.repeat_interleave(groups, dim=1)[k_index].permute(0, 2, 1, 3)
        v = value.repeat_interleave(groups, dim=1)[k_index].permute(0, 2, 1, 3)
        mask = (valid_k[:, None, :] & (k_index[:, None, :] <= q_pos[:, :, None]))[:, None]  # [n,1,Lq,Lk]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale)                                       # [n, np, Lq, hn]
        out = out.permute(0, 2, 1, 3)[valid_q]                              # [T / cp, np, hn] in order
        return out.reshape(query.shape[0], 1, -1)


def packed_seq_params_padded(params) -> torch.Tensor:
    """The padded sample boundaries of a PackedSeqParams (the real ones where none are given)."""
    padded = params.cu_seqlens_q_padded
    return params.cu_seqlens_q if padded is None else padded


def _segment_ids(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    if ids.numel() < total:  # padding after the last sequence attends only to itself
        pad = torch.arange(total - ids.numel(), device=device) + len(lengths)
        ids = torch.cat([ids, pad])
    return ids
