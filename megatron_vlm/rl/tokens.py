"""The token layout every function in `megatron_vlm.rl` takes: packed flat tokens plus `cu_seqlens`.

    values [T], mask [T], cu_seqlens [S + 1] (int64, cu_seqlens[0] = 0, cu_seqlens[-1] = T)

Sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1]; `mask` is 1 on response tokens that enter the
loss (prompt, padding, inserted and masked-out tokens are 0). This is the layout of
`kernels.policy_loss` (so a loss can hand its inputs to the kernel unchanged) and of the packed THD
micro-batches the trainer feeds megatron. Sequence-level quantities (rewards, lengths, sequence
advantages) are [S].

A padded [B, L] batch needs no copy: `flatten_padded` views it as B sequences of L tokens each,
which gives the same value for every aggregation mode (and for "seq-mean-token-sum-norm" the
padded length L as divisor, as in verl).
"""
from __future__ import annotations

import torch


def flatten_padded(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L] values and mask -> (values [B*L], mask [B*L], cu_seqlens [B+1])."""
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"flatten_padded needs [B, L] values and mask, got {tuple(values.shape)} and "
                         f"{tuple(mask.shape)}")
    B, L = values.shape
    cu_seqlens = torch.arange(B + 1, device=values.device, dtype=torch.int64) * L
    return values.reshape(-1), mask.reshape(-1), cu_seqlens


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]


def seq_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T] index of the sequence each token belongs to."""
    lengths = seq_lengths(cu_seqlens)
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def seq_to_tokens(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Broadcast [S] per-sequence values to their tokens: [T]."""
    return torch.repeat_interleave(values, seq_lengths(cu_seqlens).to(values.device))

