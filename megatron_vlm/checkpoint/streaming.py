"""Stream full, HF-named tensors out of a sharded megatron model: `iter_hf_weights`.

Every rank receives every tensor (the colocated rollout engines on all ranks need the full weights;
an exporter on rank 0 just writes them). For each conversion rule, each megatron tensor it needs is
gathered where it lives and then shared:
  tensor parallel   all-gather over TP (expert TP for experts) along `sharding.split_dim`;
                    SwiGLU fc1 halves are gathered separately ([gate; up] per rank);
  expert parallel   broadcast from the EP rank that owns the expert (global id e lives on EP rank
                    e // local_experts);
  pipeline          broadcast from the stage that holds the layer. The receivers allocate it from
                    a shape table that each stage computes for its own tensors from its local
                    shards and shares once per stream (one object all-gather over PP, not one
                    object broadcast per tensor).
DP and CP replicas already hold identical copies. Extra memory is one rule's tensors (at most one
layer's experts), never the model. `bucket_bytes` groups consecutive tensors for the weight sync.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch

from megatron_vlm.checkpoint.hf_rules import Rule
from megatron_vlm.checkpoint.sharding import canonical_name, is_expert_param, split_dim

_LAYER = re.compile(r"language\.decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


class _Locator:
    """Where a full megatron name lives on this layout, and its local name on the owner."""

    def __init__(self, model: torch.nn.Module):
        from megatron.core import parallel_state as ps

        config = model.config
        self.params = {canonical_name(n): p for n, p in model.named_parameters()}
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.layers_per_stage = config.num_layers // self.pp_size
        experts = config.num_moe_experts or 1
        self.ep_size = ps.get_expert_model_parallel_world_size()
        self.ep_rank = ps.get_expert_model_parallel_rank()
        self.local_experts = experts // self.ep_size
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.etp_size = ps.get_expert_tensor_parallel_world_size()
        self.full_meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # see share_meta

    def stage(self, name: str) -> int:
        m = _LAYER.search(name)
        if m:
            return int(m.group(1)) // self.layers_per_stage
        if name.startswith(("language.output_layer", "language.decoder.final_layernorm")):
            return self.pp_size - 1
        return 0

    def local_name(self, name: str) -> tuple[str, int]:
        """(name of the same tensor slot on this rank, EP rank owning the expert or -1)."""
        name = _LAYER.sub(lambda m: f"language.decoder.layers.{int(m.group(1)) % self.layers_per_stage}.",
                          name, count=1)
        m = _EXPERT.search(name)
        if not m:
            return name, -1
        expert = int(m.group(1))
        local = _EXPERT.sub(f".local_experts.{expert % self.local_experts}.", name, count=1)
        return local, expert // self.local_experts

    def owned_param(self, name: str) -> tuple[str, torch.Tensor, int]:
        """(local name, local shard, owning EP rank or -1) of `name` on its pipeline stage."""
        local, owner_ep = self.local_name(name)
        if local not in self.params:
            raise KeyError(f"{name!r}: no parameter {local!r} on pipeline stage {self.stage(name)}")
        return local, self.params[local], owner_ep

    def share_meta(self, names: list[str]) -> None:
        """(full shape, dtype) of every name, on every stage: each stage derives its own tensors'
        from the local shards (the TP split dim times the (expert) TP size; an expert's local slot has
        the shape of the owning EP rank's) and one all_gather_object over PP shares them. Collective."""
        from megatron.core import parallel_state as ps

        if self.pp_size == 1:
            return
        own = {}
        for name in names:
            if self.stage(name) == self.pp_rank:
                local, param, _ = self.owned_param(name)
                shape, dim = list(param.shape), split_dim(local, param)
                if dim is not None:
                    shape[dim] *= self.etp_size if is_expert_param(local) else self.tp_size
                own[name] = (tuple(shape), param.dtype)
        stages = [None] * self.pp_size
        torch.distributed.all_gather_object(stages, own, group=ps.get_pipeline_model_parallel_group())
        for stage_meta in stages:
            self.full_meta.update(stage_meta)


def _gather_tensor_parallel(param: torch.Tensor, name: str) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    # A copy, never a view of the parameter: broadcasts below write into the tensor on receivers.
    dim = split_dim(name, param)
    if dim is None:
        return param.detach().clone()
    if is_expert_param(name):
        group, size = ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size()
    else:
        group, size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return param.detach().clone()
    pieces = [torch.empty_like(param) for _ in range(size)]
    torch.distributed.all_gather(pieces, param.detach().contiguous(), group=group)
    if name.endswith("linear_fc1.weight"):  # [gate_r; up_r] on each rank
        halves = [p.chunk(2, dim=dim) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(pieces, dim=dim)


def gather_full(locator: _Locator, name: str) -> torch.Tensor:
    """The full tensor `name` on every rank (collective: every rank calls it in the same order;
    with PP > 1 after `locator.share_meta` over the names)."""
    from megatron.core import parallel_state as ps

    owner_stage = locator.stage(name)
    tensor = None
    if owner_stage == locator.pp_rank:
        local, param, owner_ep = locator.owned_param(name)
        tensor = _gather_tensor_parallel(param, local)
        if owner_ep >= 0 and locator.ep_size > 1:
            group = ps.get_expert_model_parallel_group()
            src = torch.distributed.get_process_group_ranks(group)[owner_ep]
            tensor = tensor.contiguous()
            torch.distributed.broadcast(tensor, src=src, group=group)
    if locator.pp_size > 1:
        group = ps.get_pipeline_model_parallel_group()
        src = torch.distributed.get_process_group_ranks(group)[owner_stage]
        if tensor is None:
            shape, dtype = locator.full_meta[name]
            tensor = torch.empty(shape, dtype=dtype, device=_device(locator))
        tensor = tensor.contiguous()
        torch.distributed.broadcast(tensor, src=src, group=group)
    return tensor


def _device(locator: _Locator) -> torch.device:
    return next(iter(locator.params.values())).device


def iter_hf_weights(model: torch.nn.Module, rules: list[Rule]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every HF tensor of the model, one rule at a time, on every rank."""
    locator = _Locator(_unwrap(model))
    locator.share_meta([name for rule in rules for name in rule.mcore])
    for rule in rules:
        full = [gather_full(locator, name) for name in rule.mcore]
        yield from zip(rule.hf, rule.to_hf(full))


def iter_hf_buckets(model: torch.nn.Module, rules: list[Rule], bucket_bytes: int):
    """Lists of (HF name, tensor) of at most `bucket_bytes` each (a single larger tensor goes
    alone): the unit of the rollout engines' weight sync."""
    bucket, size = [], 0
    for name, tensor in iter_hf_weights(model, rules):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
