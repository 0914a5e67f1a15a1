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
gradients of every rank and keeps this rank's chunks. Memory is O(S) per rank for K/V, which is
fine for the CPU path; the GPU path uses TE's ring attention.
"""
from __future__ import annotations

import math

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule


def cp_chunk_order(cp_size: int) -> list[int]:
    """Chunk ids in the order an all-gather over CP ranks returns them (rank r: r, 2cp-1-r)."""
    return [c for r in range(cp_size) for c in (r, 2 * cp_size - 1 - r)]


def cp_local_positions(seq_len_local: int, cp_size: int, cp_rank: int, device) -> torch.Tensor:
    """Global token positions of this CP rank's local tokens (two chunks)."""
    chunk = seq_len_local // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])


class _GatherSequenceOverCP(torch.autograd.Function):
    """[s_local, ...] on each CP rank -> [s_global, ...] in natural order; backward sums grads."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        cp_size = group.size()
        ctx.group, ctx.cp_size, ctx.rank = group, cp_size, group.rank()
        pieces = [torch.empty_like(local) for _ in range(cp_size)]
        torch.distributed.all_gather(pieces, local.contiguous(), group=group)
        chunks = [c for piece in pieces for c in piece.chunk(2, dim=0)]  # in cp_chunk_order
        order = cp_chunk_order(cp_size)
        natural = [None] * (2 * cp_size)
        for chunk_id, chunk in zip(order, chunks):
            natural[chunk_id] = chunk
        return torch.cat(natural, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        chunks = grad.chunk(2 * ctx.cp_size, dim=0)
        r = ctx.rank
        return torch.cat([chunks[r], chunks[2 * ctx.cp_size - 1 - r]], dim=0), None


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
        if packed_seq_params is not None and cp_size == 1 and attention_mask is None and query.shape[1] == 1:
            return self._packed(query, key, value, packed_seq_params.cu_seqlens_q)
        if cp_size > 1:
            if packed_seq_params is not None or attention_mask is not None:
                raise ValueError("CoreAttention: CP on CPU supports unpacked causal sequences only")
            key = _GatherSequenceOverCP.apply(key, self.cp_group)
            value = _GatherSequenceOverCP.apply(value, self.cp_group)
            q_pos = cp_local_positions(sq, cp_size, self.cp_group.rank(), query.device)
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


def _segment_ids(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    if ids.numel() < total:  # padding after the last sequence attends only to itself
        pad = torch.arange(total - ids.numel(), device=device) + len(lengths)
        ids = torch.cat([ids, pad])
    return ids
