"""CPU compatibility layer for megatron-core 0.16.1: the one place where megatron is patched.

megatron-core is written for CUDA. On a CPU with the gloo backend it runs unchanged except at the
sites below; each patch names the megatron file it works around, and `tests/parallel/
test_cpu_compat.py` shows each site failing without its patch. `apply()` is called by the runtime
only when the device is CPU; nothing here is imported on a GPU run.

Where a config switch avoids a site, the switch is used instead of a patch (see
`megatron_vlm.models.language.cpu_safe_overrides`): use_cpu_initialization,
gradient_accumulation_fusion=False, the bias/activation/softmax/rope fusions off,
batch_p2p_sync=False; moe_grouped_gemm / moe_permute_fusion are off by their per-device default
(`models.specs.BackendConfig`).

Sites (megatron/core/...):
  1. `torch.cuda.current_device()` used as `device=` in ~150 places (first hit
     tensor_parallel/mappings.py; also layers, rotary, router, p2p shapes): returns "cpu".
 1b. pipeline_parallel/p2p_communication.py calls `torch.cuda.synchronize()` after the shape
     exchange of variable-length micro-batches: a no-op on CPU.
  2. tensor_parallel/random.py: the CUDA RNG tracker reads and writes CUDA generator states:
     the tracker's state get/set and `add` use the CPU generator.
  3. transformer/moe/moe_utils.py: `RouterGatingLinearFunction` reads `te_general_gemm`, which is
     only defined when Transformer Engine imports (a NameError in megatron itself): defined as None.
  4. transformer/torch_norm.py: the torch-norm fallback asserts no sequence parallelism: the CPU
     layer spec uses `SequenceParallelRMSNorm` below, which marks its weight for the TP all-reduce
     that finalize_model_grads performs for sequence-parallel params.
  5. transformer/moe/token_dispatcher.py: the alltoall dispatcher creates a `torch.cuda.Stream()`
     and moves split sizes to host on side streams with events; and (6) moe_utils converts split
     sizes to numpy only for CUDA tensors while gloo's `all_to_all_single` (tensor_parallel/
     mappings.py) rejects tensors as split sizes: converted to numpy here too.
  7. tensor_parallel/mappings.py: uneven all-gather / reduce-scatter (expert-TP > 1 with the
     alltoall dispatcher) use list collectives that gloo rejects for unequal sizes: padded to the
     largest split.
  8. pipeline_parallel/schedules.py, optimizer/optimizer.py, optimizer/clip_grads.py,
     optimizer/grad_scaler.py, utils.py (the local multi-tensor L2 norm used by gradient clipping
     without apex/TE): `torch.zeros/tensor(..., device="cuda")`: those modules see a
     `torch` whose tensor factories map "cuda" to the CPU.
  9. models/common/embeddings/rope_utils.py: `get_pos_emb_on_this_cp_rank` pins memory and calls
     `.cuda()` (context parallelism): a CPU version.
 10. optimizer/distrib_optimizer.py, optimizer/optimizer.py (Float16 optimizer) and
     optimizer/clip_grads.py accept only `torch.cuda.*Tensor` type strings: inside those calls,
     CPU type strings read as their CUDA names.
 12. models/common/language_module/language_module.py moves the tied word embedding to CUDA
     (`weight.data.cuda()`) before syncing it between the first and last pipeline stage: inside
     that call `.cuda()` leaves tensors on the CPU.
 (11. transformer/dot_product_attention.py refuses context parallelism without Transformer Engine:
     not a patch; `megatron_vlm.parallel.cp_attention` is the core attention the CPU spec uses.)
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

_APPLIED: set[str] = set()


def apply(sites: set[str] | None = None) -> None:
    """Apply every patch (or the named subset, for tests that show a site failing). Idempotent."""
    for name, patch in PATCHES.items():
        if (sites is None or name in sites) and name not in _APPLIED:
            patch()
            _APPLIED.add(name)


def applied() -> set[str]:
    return set(_APPLIED)


# 1 -----------------------------------------------------------------------------------------------
def _patch_current_device() -> None:
    # `device=torch.cuda.current_device()` is megatron's idiom for "the device"; "cpu" is a valid
    # device argument everywhere it is used on the paths we run.
    torch.cuda.current_device = lambda: "cpu"


# 1b ----------------------------------------------------------------------------------------------
def _patch_cuda_synchronize() -> None:
    # pipeline_parallel/p2p_communication.py synchronizes after exchanging tensor shapes (variable
    # sequence lengths) regardless of batch_p2p_sync; CPU collectives are already complete.
    torch.cuda.synchronize = lambda device=None: None


# 2 -----------------------------------------------------------------------------------------------
def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        # Same contract as CudaRNGStatesTracker.add, on the CPU generator.
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cpu rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add


# 3 -----------------------------------------------------------------------------------------------
def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# 4 -----------------------------------------------------------------------------------------------
class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm constructor, usable under sequence parallelism.

    Replaces megatron's torch-norm fallback (transformer/torch_norm.py asserts
    `not config.sequence_parallel`). Under SP each TP rank normalises its own slice of tokens, so
    the weight gradient is partial: marking it `sequence_parallel` makes finalize_model_grads sum it
    over the TP group, exactly as megatron does for Transformer Engine's norms.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)  # the run's dtype
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


# 5 + 6 -------------------------------------------------------------------------------------------
def _to_host(value, as_numpy: bool):
    if torch.is_tensor(value):
        return value.cpu().numpy() if as_numpy else value.cpu()
    return value


def _patch_alltoall_dispatcher() -> None:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # The constructor creates the stream only when this class attribute is None.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()

    def maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        # Same data movement as the CUDA version, without streams and events. Split sizes become
        # numpy arrays as on CUDA (megatron skips the conversion for CPU tensors, and gloo's
        # all_to_all_single rejects tensors as split sizes).
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            tokens_per_expert = _to_host(tokens_per_expert, as_numpy=False)
            self.input_splits = _to_host(self.input_splits, as_numpy=True)
            self.output_splits = _to_host(self.output_splits, as_numpy=True)
            self.output_splits_tp = _to_host(self.output_splits_tp, as_numpy=True)
            self.num_out_tokens = _to_host(self.num_out_tokens, as_numpy=False)
            if self.num_local_experts > 1 and not self.config.moe_permute_fusion:
                self.num_global_tokens_per_local_expert = _to_host(
                    self.num_global_tokens_per_local_expert, as_numpy=False
                )
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = maybe_dtoh_and_synchronize


# 7 -----------------------------------------------------------------------------------------------
def _patch_uneven_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    gather_orig = mappings._gather_along_first_dim
    reduce_scatter_orig = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None:
            return gather_orig(input_, group, None, use_global_buffer)
        # gloo's all_gather needs equal sizes: pad every rank's piece to the largest, then trim.
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(pieces, output_split_sizes)], dim=0)

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None:
            return reduce_scatter_orig(input_, group, None, use_global_buffer)
        rank = torch.distributed.get_rank(group)
        longest = max(input_split_sizes)
        pieces = []
        for piece in torch.split(input_, input_split_sizes, dim=0):
            padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
            padded[: piece.shape[0]] = piece
            pieces.append(padded)
        output = torch.empty_like(pieces[0])
        torch.distributed.reduce_scatter(output, pieces, group=group)
        return output[: input_split_sizes[rank]]

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


# 8 -----------------------------------------------------------------------------------------------
def _cpu_device(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device"] = "cpu"
    return kwargs


class _TorchWithCpuFactories(types.ModuleType):
    """`torch` as seen by a megatron module, with `device="cuda"` in tensor factories read as CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **_cpu_device(kwargs))

    def ones(self, *args, **kwargs):
        return torch.ones(*args, **_cpu_device(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **_cpu_device(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **_cpu_device(kwargs))


def _patch_cuda_factories() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, grad_scaler, optimizer
    from megatron.core.pipeline_parallel import schedules

    shim = _TorchWithCpuFactories()
    for module in (schedules, optimizer, clip_grads, grad_scaler, utils):
        module.torch = shim


# 9 -----------------------------------------------------------------------------------------------
def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    # megatron's load-balanced CP layout: rank r holds chunks r and 2*cp-1-r of the sequence.
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, cp_idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


def _patch_rope_cp() -> None:
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank


# 10 ----------------------------------------------------------------------------------------------
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_types_read_as_cuda():
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _scoped_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_types_read_as_cuda():
            return fn(*args, **kwargs)

    return wrapper


def _patch_cuda_type_names() -> None:
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.__init__ = _scoped_cuda_type_names(DistributedOptimizer.__init__)
    build = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__
    DistributedOptimizer._build_model_and_main_param_groups = classmethod(
        _scoped_cuda_type_names(build))
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _scoped_cuda_type_names(
        optimizer.Float16OptimizerWithFloat16Params.__init__)
    clip = _scoped_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip  # imported by name there


# 12 ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tensor_cuda_stays_on_cpu():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_tied_embedding_sync() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    setup = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(setup)
    def wrapper(self, *args, **kwargs):
        with _tensor_cuda_stays_on_cpu():
            return setup(self, *args, **kwargs)

    LanguageModule.setup_embeddings_and_output_layer = wrapper


PATCHES = {
    "current_device": _patch_current_device,
    "cuda_synchronize": _patch_cuda_synchronize,
    "rng_tracker": _patch_rng_tracker,
    "te_general_gemm": _patch_te_general_gemm,
    "alltoall_dispatcher": _patch_alltoall_dispatcher,
    "uneven_collectives": _patch_uneven_collectives,
    "cuda_factories": _patch_cuda_factories,
    "rope_cp": _patch_rope_cp,
    "cuda_type_names": _patch_cuda_type_names,
    "tied_embedding_sync": _patch_tied_embedding_sync,
}
