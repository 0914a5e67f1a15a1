"""Sequence packing: plans that fill micro-batches and balance DP ranks, varlen pack / unpack, and
the THD layout megatron expects (cu_seqlens, per-sample positions, 3-D M-RoPE positions).

Planning (`plan_packs`) is host-side integer work on sample lengths:
1. cost per sample = tokens + quadratic * tokens^2 + image * image_tokens (`PackCost`): the
   linear layers cost per token, causal attention per token pair, the vision encoder per image
   token. Balancing cost rather than text length is what evens out step time across ranks.
2. Karmarkar-Karp (largest differencing, multiway) splits the samples into `dp_size` sets of near
   equal cost.
3. Every rank gets the same number of micro-batches k (the pipeline schedule needs it): the least k
   for which each rank's samples fit the token budget. Samples go, largest cost first, into the
   micro-batch of least cost that still has room (LPT under a capacity), which both packs and
   balances; if a sample fits nowhere, k grows by one.

Pack / unpack move rows between [B, L, ...] padded and [T, ...] packed layouts: a Triton kernel
(grid: sample x row tile, one masked row copy per program) on GPU, one index_select / index_copy on
CPU; both are autograd functions (each is the other's backward).

THD semantics: tokens of all samples lie end to end; sample i is rows cu_seqlens[i]:cu_seqlens[i+1]
and attends causally to itself only (`kernels.reference.thd_attention_mask_ref` is the dense mask,
True = masked out, as megatron's attention masks). With padding for TP / CP divisibility, the padded
boundaries go in cu_seqlens_*_padded; `thd_params` returns megatron's PackedSeqParams fields.
"""
import heapq
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.logprobs import resolve_impl

BLOCK_ROWS = 32     # rows one pack/unpack program copies
BLOCK_COLS = 256    # columns per step: rows of any width are copied in BLOCK_COLS slices


# ---------------------------------------------------------------------------------- planning
@dataclass(kw_only=True)
class PackCost:
    """Relative step cost of one sample. Per layer a token costs ~24 H^2 FLOPs in the dense
    linear layers and causal attention ~2 H per token pair, hence quadratic = 1 / (12 H)."""
    hidden_size: int = 4096
    image: float = 1.0  # vision-encoder cost of an image token, in units of a text token's cost

    def __call__(self, tokens, image_tokens=0):
        return tokens + tokens * tokens / (12.0 * self.hidden_size) + self.image * image_tokens


@dataclass
class PackPlan:
    microbatches: list  # [dp_rank][micro-batch] -> list of sample indices
    token_budget: int

    def stats(self, lengths, costs) -> dict:
        """Fill and balance figures (plain floats: this is host-side reporting)."""
        mb_tokens = [[sum(lengths[i] for i in mb) for mb in rank] for rank in self.microbatches]
        mb_costs = [[sum(costs[i] for i in mb) for mb in rank] for rank in self.microbatches]
        rank_costs = [sum(c) for c in mb_costs]
        real = sum(map(sum, mb_tokens))
        count = sum(map(len, mb_tokens))
        largest = max(max(t) for t in mb_tokens)
        flat_costs = [c for rank in mb_costs for c in rank]
        return {
            "microbatches_per_rank": len(self.microbatches[0]),
            "real_tokens": real,
            "fill_vs_budget": real / (count * self.token_budget),
            "fill_vs_largest": real / (count * largest),
            "largest_microbatch_tokens": largest,
            "dp_imbalance": max(rank_costs) / (sum(rank_costs) / len(rank_costs)),
            "microbatch_imbalance": max(flat_costs) / (sum(flat_costs) / len(flat_costs)),
        }


def karmarkar_karp(costs, parts):
    """Multiway largest differencing: index sets of near-equal total cost, one per part."""
    heap = []  # (-spread, tiebreak, [(subset_cost, indices)] sorted by cost descending)
    for i, c in enumerate(costs):
        heap.append((-c, i, [(c, [i])] + [(0.0, []) for _ in range(parts - 1)]))
    heapq.heapify(heap)
    while len(heap) > 1:
        _, tie, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        # largest subset of one with the smallest of the other
        merged = [(ca + cb, ia + ib) for (ca, ia), (cb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda s: -s[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
    return [indices for _, indices in heap[0][2]] if heap else [[] for _ in range(parts)]


def _fill(samples, lengths, costs, k, budget):
    """LPT under a capacity: None if some sample fits in none of the k micro-batches."""
    bins = [[0.0, 0, []] for _ in range(k)]  # cost, tokens, indices
    for i in sorted(samples, key=lambda i: -costs[i]):
        fits = [b for b in bins if b[1] + lengths[i] <= budget]
        if not fits:
            return None
        target = min(fits, key=lambda b: b[0])
        target[0] += costs[i]
        target[1] += lengths[i]
        target[2].append(i)
    return [b[2] for b in bins]


def plan_packs(lengths, token_budget: int, dp_size: int = 1, image_tokens=None, cost: PackCost | None = None,
               microbatches_per_rank: int | None = None) -> PackPlan:
    """Assign every sample to (DP rank, micro-batch) with at most `token_budget` tokens per
    micro-batch, the same number of micro-batches on every rank, balanced cost. lengths are total
    tokens per sample (text + image); image_tokens, if given, how many of them are image tokens."""
    lengths = [int(n) for n in lengths]
    if max(lengths) > token_budget:
        raise ValueError(f"a sample of {max(lengths)} tokens exceeds token_budget={token_budget}")
    costs = sample_costs(lengths, image_tokens, cost)
    ranks = karmarkar_karp(costs, dp_size)
    k = max(1, microbatches_per_rank or max(-(-sum(lengths[i] for i in r) // token_budget) for r in ranks))
    while True:
        plans = [_fill(r, lengths, costs, k, token_budget) for r in ranks]
        if all(p is not None for p in plans):
            return PackPlan(plans, token_budget)
        k += 1


def sample_costs(lengths, image_tokens=None, cost: PackCost | None = None):
    cost = cost or PackCost()
    images = image_tokens if image_tokens is not None else [0] * len(lengths)
    return [cost(int(n), m) for n, m in zip(lengths, images)]


# ------------------------------------------------------------------------------ THD layout
def cu_seqlens_from_lengths(lengths, pad_to_multiple: int = 1):
    """(cu_seqlens, cu_seqlens_padded), int32 [B + 1]: real and padded sample boundaries. Pad each
    sample to a multiple of e.g. 2 * CP (megatron's CP load balancing) or TP under SP."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    padded = (lengths + pad_to_multiple - 1) // pad_to_multiple * pad_to_multiple
    zero = torch.zeros(1, dtype=torch.int64)
    return (torch.cat([zero, lengths.cumsum(0)]).to(torch.int32),
            torch.cat([zero, padded.cumsum(0)]).to(torch.int32))


def thd_params(cu_seqlens, cu_seqlens_padded=None, max_seqlen: int | None = None):
    """Keyword arguments for megatron.core.packed_seq_params.PackedSeqParams (self-attention).
    `max_seqlen`: the longest sample, when the caller knows it on the host (reading it from
    cu_seqlens on a GPU is a device sync)."""
    padded = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if max_seqlen is None else int(max_seqlen)
    return dict(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                cu_seqlens_q_padded=padded, cu_seqlens_kv_padded=padded, max_seqlen_q=max_len, max_seqlen_kv=max_len)


def position_ids(cu_seqlens):
    """[T] int64: 0..n_i-1 within each packed sample."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(int(cu_seqlens[-1]), dtype=torch.int64) - starts


def mrope_position_ids(samples):
    """[3, T] int64 (temporal, height, width) M-RoPE positions of packed samples, each restarting at 0.

    A sample is a list of segments: an int n is n text tokens (all three ids advance together), a
    tuple (t, h, w) is an image / video grid after spatial merging, laid out t-major; as in
    Qwen2-VL's get_rope_index, grid ids are offset by the next free position and the text after it
    starts at the grid's largest id + 1.
    """
    out = []
    for segments in samples:
        start = 0
        for seg in segments:
            if isinstance(seg, int):
                pos = torch.arange(seg, dtype=torch.int64).expand(3, seg) + start
            else:
                t, h, w = seg
                grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
                pos = grid.reshape(3, -1) + start
            out.append(pos)
            if pos.numel():
                start = int(pos.max()) + 1
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.int64)


# --------------------------------------------------------------------------- pack / unpack
@triton.jit
def _copy_rows_kernel(padded_ptr, packed_ptr, cu_ptr, L, D,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, UNPACK: tl.constexpr):
    """Rows of sample b, tile r: packed[cu[b] + t] <-> padded[b, t] for t < length_b."""
    b = tl.program_id(0)
    start = tl.load(cu_ptr + b).to(tl.int64)
    length = tl.load(cu_ptr + b + 1).to(tl.int64) - start
    rows = tl.program_id(1).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < length
    padded_rows = (b.to(tl.int64) * L + rows) * D
    packed_rows = (start + rows) * D
    for c in range(0, D, BLOCK_COLS):
        cols = c + tl.arange(0, BLOCK_COLS)
        mask = row_mask[:, None] & (cols < D)[None, :]
        if UNPACK:
            x = tl.load(packed_ptr + packed_rows[:, None] + cols[None, :], mask=mask)
            tl.store(padded_ptr + padded_rows[:, None] + cols[None, :], x, mask=mask)
        else:
            x = tl.load(padded_ptr + padded_rows[:, None] + cols[None, :], mask=mask)
            tl.store(packed_ptr + packed_rows[:, None] + cols[None, :], x, mask=mask)


def _flat_index(cu_seqlens, max_len):
    """[T] row of each packed token in the [B * L] flattened padded layout."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    sample = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    return sample * max_len + torch.arange(int(cu[-1]), device=cu.device) - cu[:-1][sample]


def pack_fwd(padded, cu_seqlens, impl):
    B, L = padded.shape[:2]
    rows = padded.reshape(B * L, -1)
    if impl == "torch":
        return rows.index_select(0, _flat_index(cu_seqlens, L).to(padded.device)).reshape(-1, *padded.shape[2:])
    packed = padded.new_empty(int(cu_seqlens[-1]), rows.shape[1])
    grid = (B, triton.cdiv(L, BLOCK_ROWS))
    _copy_rows_kernel[grid](rows.contiguous(), packed, cu_seqlens.to(padded.device), L, rows.shape[1],
                            BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, UNPACK=False)
    return packed.reshape(-1, *padded.shape[2:])


def unpack_fwd(packed, cu_seqlens, max_len, fill, impl):
    B = len(cu_seqlens) - 1
    rows = packed.reshape(packed.shape[0], -1)
    out = packed.new_full((B * max_len, rows.shape[1]), fill)
    if impl == "torch":
        out.index_copy_(0, _flat_index(cu_seqlens, max_len).to(packed.device), rows)
    else:
        grid = (B, triton.cdiv(max_len, BLOCK_ROWS))
        _copy_rows_kernel[grid](out, rows.contiguous(), cu_seqlens.to(packed.device), max_len, rows.shape[1],
                                BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, UNPACK=True)
    return out.reshape(B, max_len, *packed.shape[1:])


class Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded, cu_seqlens, impl):
        ctx.save_for_backward(cu_seqlens)
        ctx.max_len, ctx.impl = padded.shape[1], impl
        return pack_fwd(padded, cu_seqlens, impl)

    @staticmethod
    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return unpack_fwd(grad, cu_seqlens, ctx.max_len, 0, ctx.impl), None, None


class Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, cu_seqlens, max_len, fill, impl):
        ctx.save_for_backward(cu_seqlens)
        ctx.impl = impl
        return unpack_fwd(packed, cu_seqlens, max_len, fill, impl)

    @staticmethod
    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return pack_fwd(grad, cu_seqlens, ctx.impl), None, None, None, None


def pack(padded, cu_seqlens, impl: str = "auto"):
    """[B, L, ...] -> [cu_seqlens[-1], ...]: the first n_b rows of every sample, end to end."""
    return Pack.apply(padded, cu_seqlens, resolve_impl(impl, padded))


def unpack(packed, cu_seqlens, max_len: int, fill=0, impl: str = "auto"):
    """[T, ...] -> [B, max_len, ...]; rows past each sample's length hold `fill`."""
    return Unpack.apply(packed, cu_seqlens, max_len, fill, resolve_impl(impl, packed))
