"""Log-probabilities and entropy of a (vocab-parallel) language-model head, without [T, V] logits.

    logprobs, entropy = linear_logprobs(hidden [T, H], weight [V/tp, H], labels [T], temperature)

The logits z = hidden @ weight^T / temperature are never stored whole; what crosses tiles, chunks
and TP ranks is [T]-sized: the row max, the sum of exp(z - max), the target logit and (for the
entropy) the sum of exp(z - max) * z.

Two implementations behind one dispatch (`impl="auto"`: Triton for CUDA tensors, torch otherwise):
- Triton forward (`_fwd_kernel`): each program streams SPLIT_COLUMNS vocab columns in tiles with an
  online max / log-sum-exp in fp32 and writes per-split partial statistics, merged (and
  all-reduced over TP) in `combine_partials`. Entropy and target logit are fused in the same pass.
- Triton backward, token chunk by token chunk: `_dlogits_kernel` recomputes each [BLOCK_T,
  BLOCK_V] logits tile from the saved fp32 log-sum-exp and writes d loss / d logits for the chunk
  in the run dtype ([T_chunk, V/tp], the only large buffer); then two cuBLAS GEMMs through torch:
  d hidden[chunk] = dlogits @ W and d W += dlogits^T @ hidden[chunk].
- torch (the CPU default): token blocks of full vocabulary rows ([Tb, V/tp] fp32, tens of MiB),
  in-place max / exp / sum; the backward recomputes each block's logits once.
`kernels.policy_loss` reuses both to fuse the head with the loss (gradients formed in the forward).

Why the backward writes a d logits chunk and calls cuBLAS (option a of issue #15) rather than
atomics or kernels that own output tiles (option b). Chosen by reasoning, not measured: no GPU has
run this code yet.
- The previous backward formed d logits per tile and atomically added its share of d hidden and d
  weight: T * V * H * (1/BLOCK_V + 1/BLOCK_T) fp32 atomics, 3e10 for an 8k-token pack at V/tp = 76k,
  H = 2048, with token blocks fastest in the launch order, so ~128 programs hit the same d weight
  rows at once. (a) has no atomics at all: every output element is written by one program or one
  cuBLAS tile, and the result is deterministic run to run.
- (b) needs a program that owns a d weight tile to hold [BLOCK_V, H] accumulators (1 MiB in fp32 at
  H = 2048, far above an SM's registers and shared memory), or to own [BLOCK_V, BLOCK_H] and
  recompute the full-H logits tile H / BLOCK_H times; and its d hidden kernel recomputes the logits
  a second time. (a) does 8*T*H*V FLOPs (forward, one recompute, two GEMMs), (b) at least 10.
- Half of (a)'s FLOPs are plain GEMMs (M = T_chunk, N = H, K = V/tp and M = V/tp, N = H, K = T_chunk)
  where cuBLAS runs near its best; the price is writing and reading the d logits chunk twice
  (~3.7 GB of traffic for that 8k x 76k pack, under 1 ms at H200 bandwidth, against ~10 ms of math).
- Counted as 6*T*H*V (the usual figure), the recompute caps (a) at 75% of the rate its kernels
  reach; the issue's 60%-of-bf16-peak goal needs them at ~80% of peak. Unmeasured.
Chunks: DLOGITS_CHUNK_BYTES bounds the d logits chunk. With more than one chunk and bf16 weights,
d weight accumulates in an fp32 [V/tp, H] buffer (cuBLAS with out_dtype=float32 on CUDA), so each
chunk is not rounded to bf16; with one chunk (or fp32) the GEMM writes d weight directly.

Precision: tiles enter `tl.dot` in the run dtype (bf16 on the tensor cores), accumulation and the
log-sum-exp are fp32. For fp32 inputs the dot's input_precision is "ieee" unless the process asks
torch for TF32 (`torch.set_float32_matmul_precision("high")` or "medium"), which then applies to
these kernels as it does to the backward's cuBLAS GEMMs: ~1e-3 relative error on the logits for
roughly 8x the fp32 FLOP rate. Under TRITON_INTERPRET=1 the same bf16 dots run on CPU through
`kernels.interpret` (Triton 3.9's interpreter mishandles bf16 dots on its own).

Tiles and warps are autotuned (`triton.autotune`, keyed on H and V/tp) over a small set of configs;
`tuned_configs()` reports the chosen ones (the benchmark records them). Interpreted: one config.

Vocab parallelism follows megatron's ColumnParallelLinear output layer: rank r holds rows
[r * V/tp, (r+1) * V/tp) of the weight and full labels; the [T]-sized statistics are all-reduced
(MAX, then one SUM of a stacked [3, T]); d weight is local; d hidden is all-reduced, or with
sequence parallelism (hidden arrives as this rank's [T/tp, H] slice) all-gathered in the forward and
reduce-scattered in the backward.
"""
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.interpret import interpreting, patch_bf16_dot

patch_bf16_dot()  # no-op unless TRITON_INTERPRET=1

# Vocab columns one forward program streams: enough work per program to amortise loading its hidden
# rows, few enough that small T still fills the GPU (V/tp = 76k: 38 splits x T/BLOCK_T programs).
# A multiple of every config's BLOCK_V, so the partials' shape does not depend on the tuned config.
SPLIT_COLUMNS = 2048
# The backward's d logits chunk [T_chunk, V/tp] in the run dtype: 512 MiB is 1.5k rows at V = 152k
# in bf16 (8k at 32k), long enough for the d weight GEMM (K = T_chunk) to run at full rate.
DLOGITS_CHUNK_BYTES = 1 << 29
CHUNK_ROW_MULTIPLE = 128
# Autotuned tiles. BLOCK_T x BLOCK_V is one fp32 logits tile held in registers; BLOCK_H is the K step
# of the dot (>= 16, as tl.dot requires); GROUP_T token blocks sweep the vocab together in the
# backward so a weight tile is reused from L2. A small set: every config is benchmarked once per
# (H, V/tp), and a VLM run sees one or two such shapes.
# Checked by compiling for sm_90 without a GPU (`python -m kernels.bench.compile`): in bf16 all five
# use wgmma with cp.async pipelining and none spills registers (128 x 256 tiles on 8 warps, 128 x 128
# and 128 x 64 on 4 warps did: dropped). fp32 "ieee" dots compile to FMA loops that spill: the slow path.
GPU_CONFIGS = [
    triton.Config(dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64), num_warps=8, num_stages=4),
    triton.Config(dict(BLOCK_T=64, BLOCK_V=256, BLOCK_H=64), num_warps=8, num_stages=4),
    triton.Config(dict(BLOCK_T=64, BLOCK_V=128, BLOCK_H=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=32), num_warps=8, num_stages=5),
]
# Interpreted (CPU tests): one config, so autotune never benchmarks; tiles that do not divide the
# tests' awkward shapes (T=47, V=1237, H=96), so every mask is exercised.
INTERPRET_CONFIGS = [triton.Config(dict(BLOCK_T=32, BLOCK_V=128, BLOCK_H=64), num_warps=4, num_stages=1)]
HEAD_CONFIGS = INTERPRET_CONFIGS if interpreting() else GPU_CONFIGS
GROUP_T = 8
# torch path: fp32 elements of one [Tb, V] logits block (64 MiB: 512 rows at V=32k). The rows are
# the inner dimension of the d weight GEMM, so fewer rows cost CPU time: measured on 2 cores at
# T=4096, H=1024, V=32k, the fused loss took 1.1x / 1.0x / 0.95x / 0.93x the naive path's CPU time
# with 128 / 256 / 512 / 1024 rows; 512 keeps the block at 4% of the naive path's [T, V] buffers.
TORCH_BLOCK_ELEMENTS = 1 << 24
TORCH_BLOCK_ROWS = (64, 1024)  # clamp for very small / very large vocabularies


# --------------------------------------------------------------------------------- Triton
@triton.jit
def _logits_tile(h_ptr, w_ptr, h_rows, w_rows, t_mask, v_mask, H,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """hidden rows x weight rows^T for one [BLOCK_T, BLOCK_V] tile: run-dtype operands, fp32 acc."""
    acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
    for k in range(0, H, BLOCK_H):
        offs_h = k + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        h = tl.load(h_ptr + h_rows[:, None] + offs_h[None, :], mask=t_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptr + w_rows[:, None] + offs_h[None, :], mask=v_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.autotune(configs=HEAD_CONFIGS, key=["H", "V"])
@triton.jit
def _fwd_kernel(h_ptr, w_ptr, labels_ptr, max_ptr, sumexp_ptr, ez_ptr, target_ptr,
                T, V, H, vocab_start, inv_temp,
                SPLIT_COLUMNS: tl.constexpr, NEED_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partial statistics of one token block over one vocab split, written at [split, t]."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    local_label = tl.load(labels_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64) - vocab_start
    row_max = tl.full([BLOCK_T], -1e30, tl.float32)  # finite: exp(row_max - new_max) must not be NaN
    sumexp = tl.zeros([BLOCK_T], tl.float32)
    ez = tl.zeros([BLOCK_T], tl.float32)
    target = tl.zeros([BLOCK_T], tl.float32)
    h_rows = offs_t.to(tl.int64) * H
    for i in range(0, SPLIT_COLUMNS // BLOCK_V):
        offs_v = pid_s * SPLIT_COLUMNS + i * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        acc = _logits_tile(h_ptr, w_ptr, h_rows, offs_v.to(tl.int64) * H, t_mask, v_mask, H,
                           BLOCK_T, BLOCK_V, BLOCK_H, DOT_PRECISION)
        z = tl.where(v_mask[None, :], acc * inv_temp, float("-inf"))  # [BLOCK_T, BLOCK_V]
        new_max = tl.maximum(row_max, tl.max(z, 1))
        rescale = tl.exp(row_max - new_max)
        e = tl.exp(z - new_max[:, None])  # 0 in masked columns
        sumexp = sumexp * rescale + tl.sum(e, 1)
        if NEED_ENTROPY:
            ez = ez * rescale + tl.sum(e * tl.where(v_mask[None, :], z, 0.0), 1)  # no 0 * -inf
        # a label owned by another TP rank can still equal a padded column index of this tile
        is_target = (offs_v[None, :] == local_label[:, None]) & v_mask[None, :]
        target += tl.sum(tl.where(is_target, z, 0.0), 1)
        row_max = new_max
    out = pid_s.to(tl.int64) * T + offs_t
    tl.store(max_ptr + out, row_max, mask=t_mask)
    tl.store(sumexp_ptr + out, sumexp, mask=t_mask)
    tl.store(ez_ptr + out, ez, mask=t_mask)
    tl.store(target_ptr + out, target, mask=t_mask)


@triton.autotune(configs=HEAD_CONFIGS, key=["H", "V"])
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, dz_ptr,
                    T, V, H, vocab_start, inv_temp,
                    HAS_G_ENT: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_T: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """One [BLOCK_T, BLOCK_V] tile of d loss / d logits for a token chunk ([T, V] here), recomputed
    from the logits tile and the saved log-sum-exp, stored in dz_ptr's dtype. No atomics."""
    pid = tl.program_id(0)
    blocks_t = tl.cdiv(T, BLOCK_T)
    blocks_v = tl.cdiv(V, BLOCK_V)
    # Grouped order: GROUP_T consecutive programs share a weight tile (from L2), and the group's
    # hidden rows stay in L2 while it sweeps the vocab.
    per_group = GROUP_T * blocks_v
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(blocks_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_mask = offs_t < T
    v_mask = offs_v < V
    acc = _logits_tile(h_ptr, w_ptr, offs_t.to(tl.int64) * H, offs_v.to(tl.int64) * H, t_mask, v_mask, H,
                       BLOCK_T, BLOCK_V, BLOCK_H, DOT_PRECISION)
    lse = tl.load(lse_ptr + offs_t, mask=t_mask, other=0.0)
    g_logp = tl.load(g_logp_ptr + offs_t, mask=t_mask, other=0.0)
    local_label = tl.load(labels_ptr + offs_t, mask=t_mask, other=-1).to(tl.int64) - vocab_start
    logp_all = acc * inv_temp - lse[:, None]
    p = tl.where(t_mask[:, None] & v_mask[None, :], tl.exp(logp_all), 0.0)
    # d logp / dz = onehot - p;  d entropy / dz = -p * (log p + entropy)
    dz = -p * g_logp[:, None]
    if HAS_G_ENT:
        ent = tl.load(entropy_ptr + offs_t, mask=t_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + offs_t, mask=t_mask, other=0.0)
        dz -= p * (logp_all + ent[:, None]) * g_ent[:, None]
    dz += tl.where((offs_v[None, :] == local_label[:, None]) & v_mask[None, :], g_logp[:, None], 0.0)
    out = offs_t.to(tl.int64)[:, None] * V + offs_v[None, :]
    tl.store(dz_ptr + out, (dz * inv_temp).to(dz_ptr.dtype.element_ty), mask=t_mask[:, None] & v_mask[None, :])


def dot_precision(dtype):
    """tl.dot input_precision for operands of `dtype`. fp32: exact ("ieee") unless torch's matmul
    precision allows TF32; bf16 / fp16: the operands are native tensor-core types and the setting
    has no effect ("tf32" is Triton's NVIDIA default)."""
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"


def tuned_configs():
    """The config autotune chose for each head kernel at its last launch (None before one)."""
    return {kernel.fn.__name__: _describe(getattr(kernel, "best_config", None))
            for kernel in (_fwd_kernel, _dlogits_kernel)}


def _describe(config):
    if config is None:
        return None
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def logprobs_fwd_triton(hidden, weight, labels, temperature, vocab_start, need_entropy, split_columns=None):
    """Launch _fwd_kernel -> partial (max, sumexp, sum e*z, target), each [n_splits, T] fp32."""
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    (T, H), V = hidden.shape, weight.shape[0]
    split_columns = split_columns or SPLIT_COLUMNS
    if any(split_columns % c.kwargs["BLOCK_V"] for c in HEAD_CONFIGS):
        raise ValueError(f"split_columns must be a multiple of every BLOCK_V, got {split_columns}")
    n_splits = triton.cdiv(V, split_columns)
    partials = torch.empty(4, n_splits, T, dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), n_splits)  # noqa: E731
    _fwd_kernel[grid](hidden, weight, labels, partials[0], partials[1], partials[2], partials[3],
                      T, V, H, vocab_start, 1.0 / temperature, SPLIT_COLUMNS=split_columns,
                      NEED_ENTROPY=need_entropy, DOT_PRECISION=dot_precision(hidden.dtype))
    return partials.unbind(0)


def dlogits_chunk_rows(vocab_local, dtype):
    """Tokens per backward chunk: the [rows, V/tp] d logits block within DLOGITS_CHUNK_BYTES."""
    rows = DLOGITS_CHUNK_BYTES // (vocab_local * torch.finfo(dtype).bits // 8)
    return max(CHUNK_ROW_MULTIPLE, rows // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE)


def dlogits_triton(hidden, weight, labels, temperature, vocab_start, lse, entropy, g_logp, g_ent, out):
    """Launch _dlogits_kernel: out [T, V] (run dtype) = d loss / d logits for these T tokens."""
    (T, H), V = hidden.shape, weight.shape[0]
    has_g_ent = g_ent is not None
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(V, meta["BLOCK_V"]),)  # noqa: E731
    _dlogits_kernel[grid](hidden, weight, labels, lse, entropy if has_g_ent else lse, g_logp,
                          g_ent if has_g_ent else g_logp, out, T, V, H, vocab_start, 1.0 / temperature,
                          HAS_G_ENT=has_g_ent, DOT_PRECISION=dot_precision(hidden.dtype), GROUP_T=GROUP_T)
    return out


def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a @ b for run-dtype a, b, accumulated in fp32 without a run-dtype product."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # CPU (interpreted tests): no bf16 -> fp32 addmm kernel; the fp32 product is the same math
        acc.addmm_(a.float(), b.float())


def logprobs_bwd_triton(hidden, weight, labels, temperature, vocab_start, lse, entropy, g_logp, g_ent,
                        chunk_rows=None):
    """Chunked backward -> (d hidden [T, H] partial over this rank's vocab, d weight [V, H]), both in
    the run dtype. Per chunk: d logits (Triton), then d hidden = dlogits @ W, d W += dlogits^T @ h."""
    hidden, weight, labels = hidden.contiguous(), weight.contiguous(), labels.contiguous()
    (T, H), V = hidden.shape, weight.shape[0]
    rows = chunk_rows or dlogits_chunk_rows(V, hidden.dtype)
    g_logp = g_logp.float().contiguous()
    g_ent = g_ent.float().contiguous() if g_ent is not None else None
    dh = torch.empty(T, H, dtype=hidden.dtype, device=hidden.device)
    dlogits = torch.empty(min(rows, T), V, dtype=hidden.dtype, device=hidden.device)  # the one [T_chunk, V/tp]
    if T <= rows:  # one chunk: the GEMMs write the gradients directly (fp32 accumulation inside)
        dlogits_triton(hidden, weight, labels, temperature, vocab_start, lse, entropy, g_logp, g_ent, dlogits)
        torch.mm(dlogits, weight, out=dh)
        return dh, torch.mm(dlogits.t(), hidden)
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    for start in range(0, T, rows):
        chunk = slice(start, min(start + rows, T))
        dz = dlogits[: chunk.stop - start]
        dlogits_triton(hidden[chunk], weight, labels[chunk], temperature, vocab_start, lse[chunk],
                       entropy[chunk] if entropy is not None else None, g_logp[chunk],
                       g_ent[chunk] if g_ent is not None else None, dz)
        torch.mm(dz, weight, out=dh[chunk])
        _addmm_fp32_(dw, dz.t(), hidden[chunk])
    return dh, dw.to(weight.dtype)


# ---------------------------------------------------------------------------- TP plumbing
def tp_world_size(group):
    return dist.get_world_size(group) if group is not None else 1


def tp_rank(group):
    return dist.get_rank(group) if group is not None else 0


def combine_partials(row_max, sumexp, ez, target, group):
    """Merge partial statistics ([n, T] each, n splits of this rank's vocab) over splits and ranks.
    -> (lse, logprobs, entropy), each [T] fp32; entropy = lse - sum_v p_v z_v."""
    local_max = row_max.amax(0)
    global_max = local_max.clone()
    if tp_world_size(group) > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    rescale = torch.exp(row_max - global_max)
    sums = torch.stack([(sumexp * rescale).sum(0), (ez * rescale).sum(0), target.sum(0)])  # [3, T]
    if tp_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    total, total_ez, target = sums.unbind(0)
    lse = global_max + total.log()
    return lse, target - lse, lse - total_ez / total


def reduce_hidden_grad(dh, group, sequence_parallel):
    """Sum d hidden over the vocab shards: all-reduce, or reduce-scatter along tokens under SP."""
    if tp_world_size(group) == 1:
        return dh
    if not sequence_parallel:
        dist.all_reduce(dh, group=group)
        return dh
    world = tp_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter_tensor
        dist.all_reduce(dh, group=group)
        return dh.chunk(world)[tp_rank(group)].contiguous()
    out = dh.new_empty(dh.shape[0] // world, *dh.shape[1:])
    dist.reduce_scatter_tensor(out, dh.contiguous(), group=group)
    return out


def gather_sequence_parallel(hidden, group):
    """[T/tp, H] slices -> [T, H] on every rank (megatron's SP gather before the output layer)."""
    world = tp_world_size(group)
    if world == 1:
        return hidden
    out = hidden.new_empty(hidden.shape[0] * world, *hidden.shape[1:])
    dist.all_gather_into_tensor(out, hidden.contiguous(), group=group)
    return out


# ------------------------------------------------------------------------------ torch path
def torch_block_rows(vocab_local):
    low, high = TORCH_BLOCK_ROWS
    return max(low, min(high, TORCH_BLOCK_ELEMENTS // max(vocab_local, 1)))


def block_logits(hidden_block, weight, temperature):
    """[Tb, H] x [V, H] -> fp32 [Tb, V] logits / temperature (one new buffer)."""
    z = torch.mm(hidden_block, weight.t()).float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def block_stats(z, labels_block, vocab_start, group, need_entropy):
    """Statistics of one logits block, all-reduced over TP. Consumes z: returns e = exp(z - max)
    (in z's storage unless the entropy needs z), sumexp, lse, logprobs and entropy (or None), [Tb]."""
    V = z.shape[1]
    local = labels_block.long() - vocab_start
    owned = (local >= 0) & (local < V)
    target = z.gather(1, local.clamp(0, V - 1).unsqueeze(1)).squeeze(1) * owned
    row_max = z.amax(1)
    if tp_world_size(group) > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    z.sub_(row_max.unsqueeze(1))
    if need_entropy:  # the only case with two [Tb, V] buffers: e and z
        e = torch.exp(z)
        ez = torch.linalg.vecdot(e, z)  # sum e * (z - max)
    else:
        e, ez = z.exp_(), torch.zeros_like(row_max)
    sums = torch.stack([e.sum(1), ez, target])
    if tp_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    sumexp, ez, target = sums.unbind(0)
    log_sumexp = sumexp.log()
    lse = row_max + log_sumexp
    entropy = log_sumexp - ez / sumexp if need_entropy else None
    return e, sumexp, lse, target - lse, entropy


def add_onehot_(dz, labels_block, vocab_start, values):
    """dz[t, label_t] += values[t] for the labels this rank owns."""
    local = labels_block.long() - vocab_start
    owned = (local >= 0) & (local < dz.shape[1])
    dz.scatter_add_(1, local.clamp(0, dz.shape[1] - 1).unsqueeze(1), (values * owned).unsqueeze(1))


def logprobs_fwd_torch(hidden, weight, labels, temperature, vocab_start, group, need_entropy):
    """Token-block forward -> (lse, logprobs, entropy or None), [T] fp32, TP-reduced."""
    T = hidden.shape[0]
    rows = torch_block_rows(weight.shape[0])
    lse, logprobs = hidden.new_empty(T, dtype=torch.float32), hidden.new_empty(T, dtype=torch.float32)
    entropy = hidden.new_empty(T, dtype=torch.float32) if need_entropy else None
    for start in range(0, T, rows):
        block = slice(start, min(start + rows, T))
        z = block_logits(hidden[block], weight, temperature)
        _, _, lse[block], logprobs[block], ent = block_stats(z, labels[block], vocab_start, group, need_entropy)
        del z  # before the next block is allocated: one [Tb, V] block alive, not two
        if need_entropy:
            entropy[block] = ent
    return lse, logprobs, entropy


def block_grad_logits(z, block, labels, vocab_start, temperature, lse, entropy, g_logp, g_ent):
    """d loss / d logits of one block from its logits z (consumed): g (onehot - p) - g_ent p (log p + H)."""
    logp_all = z.sub_(lse[block].unsqueeze(1))
    g = g_logp[block].unsqueeze(1)
    if g_ent is None:
        dz = logp_all.exp_().mul_(-g)
    else:  # -p * (g + g_ent * (log p + entropy))
        p = torch.exp(logp_all)
        coef = logp_all.add_(entropy[block].unsqueeze(1)).mul_(g_ent[block].unsqueeze(1)).add_(g)
        dz = p.mul_(coef).neg_()
    add_onehot_(dz, labels[block], vocab_start, g_logp[block])
    return dz.div_(temperature) if temperature != 1.0 else dz


def logprobs_bwd_torch(hidden, weight, labels, temperature, vocab_start, lse, entropy, g_logp, g_ent):
    """Token-block backward (recomputes each block's logits once) -> (d hidden partial, d weight)."""
    T = hidden.shape[0]
    rows = torch_block_rows(weight.shape[0])
    fp32 = hidden.dtype == torch.float32
    weight32 = weight if fp32 else weight.float()
    dh = torch.empty(T, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, T, rows):
        block = slice(start, min(start + rows, T))
        z = block_logits(hidden[block], weight, temperature)
        dz = block_grad_logits(z, block, labels, vocab_start, temperature, lse, entropy, g_logp, g_ent)
        del z
        torch.mm(dz, weight32, out=dh[block])
        dw.addmm_(dz.t(), hidden[block] if fp32 else hidden[block].float())
        del dz  # before the next block is allocated: one [Tb, V] block alive, not two
    return dh.to(hidden.dtype), dw.to(weight.dtype)


# ------------------------------------------------------------------------------- dispatch
def resolve_impl(impl, tensor):
    """"auto" -> "triton" on CUDA tensors, "torch" elsewhere."""
    if impl == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    return impl


def head_forward(hidden, weight, labels, temperature, group, need_entropy, impl):
    """(lse, logprobs, entropy or None), [T] fp32, for the full-sequence hidden on this rank."""
    vocab_start = tp_rank(group) * weight.shape[0]
    if impl == "triton":
        partials = logprobs_fwd_triton(hidden, weight, labels, temperature, vocab_start, need_entropy)
        lse, logprobs, entropy = combine_partials(*partials, group)
        return lse, logprobs, entropy if need_entropy else None
    return logprobs_fwd_torch(hidden, weight, labels, temperature, vocab_start, group, need_entropy)


def head_backward(hidden, weight, labels, temperature, group, lse, entropy, g_logp, g_ent, impl):
    """(d hidden summed over this rank's vocab only, d weight) for upstream g_logp / g_ent [T]."""
    vocab_start = tp_rank(group) * weight.shape[0]
    bwd = logprobs_bwd_triton if impl == "triton" else logprobs_bwd_torch
    return bwd(hidden, weight, labels, temperature, vocab_start, lse, entropy, g_logp.float(),
               None if g_ent is None else g_ent.float())


class LinearLogProbs(torch.autograd.Function):
    """logprobs, entropy = f(hidden, weight); backward recomputes the logits block by block."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, tp_group, sequence_parallel, with_entropy, impl):
        hidden_full = gather_sequence_parallel(hidden, tp_group) if sequence_parallel else hidden
        lse, logprobs, entropy = head_forward(hidden_full, weight, labels, temperature, tp_group, with_entropy, impl)
        ctx.save_for_backward(hidden_full, weight, labels, lse, entropy)
        ctx.args = (temperature, tp_group, sequence_parallel, impl)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden_full, weight, labels, lse, entropy = ctx.saved_tensors
        temperature, tp_group, sequence_parallel, impl = ctx.args
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        dh, dw = head_backward(hidden_full, weight, labels, temperature, tp_group, lse, entropy, g_logp, g_ent, impl)
        dh = reduce_hidden_grad(dh, tp_group, sequence_parallel)
        return dh, dw, None, None, None, None, None, None


def linear_logprobs(hidden, weight, labels, temperature: float = 1.0, tp_group=None,
                    sequence_parallel: bool = False, with_entropy: bool = True, impl: str = "auto"):
    """Log-probs and entropy of the head's softmax at `labels`; never holds [T, V] fp32 logits.

    hidden [T, H] ([T/tp, H] under sequence parallelism), weight [V/tp, H] (this rank's vocab rows),
    labels [T] global vocabulary ids -> (logprobs [T] fp32, entropy [T] fp32 or None without
    with_entropy, which saves one elementwise pass), identical on every rank of `tp_group`.
    Log-probs are <= 0 by construction (target logit minus a log-sum-exp that includes it); both
    outputs are differentiable w.r.t. hidden and weight.
    """
    impl = resolve_impl(impl, hidden)
    return LinearLogProbs.apply(hidden, weight, labels, float(temperature), tp_group, sequence_parallel,
                                with_entropy, impl)
