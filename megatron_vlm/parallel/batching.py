"""Cut a global batch into this rank's piece: DP takes whole samples, CP takes sequence chunks.

CP uses megatron's load-balanced layout: the sequence is cut into 2*cp chunks and rank r keeps
chunks r and 2*cp-1-r, so that every rank gets the same share of the causal attention work. The
rotary embedding (cpu_compat site 9 / TE on GPU) and `models.attention.CoreAttention` assume it.
"""
from __future__ import annotations

import torch


def split_for_cp(tensor: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    if cp_size == 1:
        return tensor
    seq_len = tensor.shape[seq_dim]
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*cp = {2 * cp_size}")
    chunks = tensor.chunk(2 * cp_size, dim=seq_dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=seq_dim)


def merge_from_cp(pieces: list[torch.Tensor], seq_dim: int = 1) -> torch.Tensor:
    """Inverse of split_for_cp given every rank's piece (rank order)."""
    cp_size = len(pieces)
    chunks = [None] * (2 * cp_size)
    for rank, piece in enumerate(pieces):
        first, second = piece.chunk(2, dim=seq_dim)
        chunks[rank], chunks[2 * cp_size - 1 - rank] = first, second
    return torch.cat(chunks, dim=seq_dim)


def split_for_dp(tensor: torch.Tensor, dp_size: int, dp_rank: int) -> torch.Tensor:
    if tensor.shape[0] % dp_size:
        raise ValueError(f"batch size {tensor.shape[0]} is not divisible by DP = {dp_size}")
    return tensor.chunk(dp_size, dim=0)[dp_rank]


def local_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's share of a global batch of [B, S] tensors under the current megatron layout."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    return {k: split_for_cp(split_for_dp(v, dp, dp_rank), cp, cp_rank) for k, v in batch.items()}


def thd_cp_index(cu_seqlens_padded, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in a packed THD sequence [T] of CP rank `cp_rank`'s tokens [T / cp], in its order.

    The packed layout of Transformer Engine's THD context parallelism (`thd_get_partitioned_indices`)
    and megatron's THD rotary embedding (`_apply_rotary_pos_emb_thd`): every sample's padded span
    (cu_seqlens_padded, each a multiple of 2*cp) is cut into 2*cp chunks and the rank keeps chunks
    r and 2*cp-1-r of each sample, samples in pack order. Load-balanced per sample, as
    `split_for_cp` is for one whole sequence."""
    cu = torch.as_tensor(cu_seqlens_padded).tolist()  # one host read, not one per sample on a GPU
    pieces = []
    for start, stop in zip(cu[:-1], cu[1:]):
        if (stop - start) % (2 * cp_size):
            raise ValueError(f"a packed sample of {stop - start} padded tokens is not divisible by "
                             f"2*cp = {2 * cp_size}")
        chunk = (stop - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
