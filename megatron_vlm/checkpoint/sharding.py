"""Full (unsharded, TP=PP=EP=1) megatron tensors <-> this rank's shards, for any TP/PP/EP/ETP.

The full state dict uses the names a TP=1, PP=1, EP=1 model has: global layer numbers and global
expert ids. A rank's model uses local names (layer numbers restart at 0 on each pipeline stage,
experts restart at 0 on each expert-parallel rank). `global_name` maps one to the other, and
`shard_tensor` cuts a full tensor the way megatron splits it:

- tensor-parallel params carry `tensor_model_parallel` / `partition_dim` (set by megatron's linear
  and embedding layers): contiguous split along that dim over TP (expert-TP for experts). Experts
  take the dim from the name table instead (`split_dim`): Transformer Engine marks them wrongly;
- SwiGLU `linear_fc1` holds [gate; up] stacked on dim 0: each half is split separately, so a rank
  holds [gate_r; up_r];
- `linear_qkv` is stored grouped per query group ([q heads of group g; k_g; v_g] for each g), so a
  contiguous split hands each rank whole groups.

This is the layer between HF conversion (checkpoint/hf.py builds the full megatron tensors from HF
names) and a sharded model; the equivalence tests use it to load the same weights into every layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"(^|\.)decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class RankLayout:
    """Where this rank sits: what `global_name` and `shard_tensor` need to know."""
    tp_rank: int
    tp_size: int
    etp_rank: int
    etp_size: int
    ep_rank: int
    ep_size: int
    layer_offset: int        # global index of this pipeline stage's first layer
    num_local_experts: int
    gated_linear_unit: bool = True
    layers_per_stage: int = 1 << 30
    is_last_stage: bool = True

    @classmethod
    def current(cls, config, vp_stage=None) -> "RankLayout":
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        experts = config.num_moe_experts or 1
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(),
            layer_offset=get_transformer_layer_offset(config, vp_stage=vp_stage),
            num_local_experts=experts // ps.get_expert_model_parallel_world_size(),
            gated_linear_unit=config.gated_linear_unit,
            layers_per_stage=config.num_layers // ps.get_pipeline_model_parallel_world_size(),
            is_last_stage=ps.is_pipeline_last_stage(),
        )


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


# How megatron's local-spec layers split their weights over TP (None: replicated). Checked against
# the parameters' own `partition_dim` whenever a model is at hand (shard_state_dict), and used
# alone by offline conversion, which never builds the model.
_PARTITION_DIMS = (
    ("embedding.word_embeddings.weight", 0),
    ("output_layer.weight", 0),
    ("linear_qkv.weight", 0), ("linear_qkv.bias", 0),
    ("linear_proj.weight", 1),
    ("linear_fc1.weight", 0), ("linear_fc1.bias", 0),
    ("linear_fc2.weight", 1),
)


def partition_dim_of(name: str) -> int | None:
    if name.startswith("vision."):
        return None
    for suffix, dim in _PARTITION_DIMS:
        if name.endswith(suffix):
            return dim
    return None


def split_dim(name: str, param: torch.Tensor) -> int | None:
    """The dim `param` (canonical name `name`) is split along over (expert) TP; None: replicated.

    Experts come from the name table, not the attribute: with EP > 1 or expert TP > 1 megatron
    builds Transformer Engine's expert linears with `parallel_mode=None` and does the split itself,
    and TE then marks every such weight `partition_dim=0`, though `linear_fc2` is split along 1.
    """
    if is_expert_param(name):
        return partition_dim_of(name)
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def local_name(full_name: str, layout: RankLayout) -> str | None:
    """Name in the full model -> this rank's name, or None when the tensor lives elsewhere
    (another pipeline stage or expert-parallel rank). Stage ranges come from `layer_offset` and
    `layers_per_stage`; non-layer tensors: embedding / vision on the first stage, output layer and
    final norm on the last."""
    m = _LAYER.search(full_name)
    if m:
        layer = int(m.group(2)) - layout.layer_offset
        if not 0 <= layer < layout.layers_per_stage:
            return None
        full_name = _LAYER.sub(lambda x: f"{x.group(1)}decoder.layers.{layer}.", full_name, count=1)
    elif full_name.endswith(("output_layer.weight", "decoder.final_layernorm.weight")):
        if not layout.is_last_stage:
            return None
    elif layout.layer_offset != 0:
        return None
    m = _EXPERT.search(full_name)
    if m:
        expert = int(m.group(1)) - layout.ep_rank * layout.num_local_experts
        if not 0 <= expert < layout.num_local_experts:
            return None
        full_name = _EXPERT.sub(f".mlp.experts.local_experts.{expert}.", full_name, count=1)
    return full_name


def global_name(local_name: str, layout: RankLayout) -> str:
    """Local parameter name on this rank -> name in the full (TP=PP=EP=1) model."""
    def layer(m):
        return f"{m.group(1)}decoder.layers.{int(m.group(2)) + layout.layer_offset}."

    name = _LAYER.sub(layer, local_name, count=1)

    def expert(m):
        return f".mlp.experts.local_experts.{int(m.group(1)) + layout.ep_rank * layout.num_local_experts}."

    return _EXPERT.sub(expert, name, count=1)


def shard_tensor(full: torch.Tensor, local_name: str, dim: int | None, layout: RankLayout) -> torch.Tensor:
    """This rank's piece of `full` for a tensor split along `dim` (None: replicated)."""
    if dim is None:
        return full
    if is_expert_param(local_name):
        rank, size = layout.etp_rank, layout.etp_size
    else:
        rank, size = layout.tp_rank, layout.tp_size
    if size == 1:
        return full
    if layout.gated_linear_unit and local_name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def merge_shards(pieces: list[torch.Tensor], dim: int | None, gated: bool) -> torch.Tensor:
    """The full tensor from its (expert) TP pieces in rank order: the inverse of `shard_tensor`.
    `gated`: a SwiGLU `linear_fc1` weight, whose pieces are [gate_r; up_r] (gates first, then ups)."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    if gated:
        halves = [piece.chunk(2, dim=dim) for piece in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(pieces, dim=dim)


# Transformer Engine's layer spec (GPU) fuses the norms into the following linear layers and
# groups the experts; its parameter names map onto the local-spec names every conversion uses.
# Not exercised on this CPU machine (no Transformer Engine): checked as a string mapping only.
_TE_ALIASES = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)$"),
     r"mlp.experts.local_experts.\2.\1.weight"),
)


def canonical_name(name: str) -> str:
    """A parameter name of either layer spec -> the local-spec name the conversion rules use."""
    for pattern, replacement in _TE_ALIASES:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name


def shard_state_dict(full: dict[str, torch.Tensor], model: torch.nn.Module, layout: RankLayout,
                     tied_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Cut a full state dict into `model`'s local parameters (names as `model.named_parameters`)."""
    local = {}
    for name, param in model.named_parameters():
        key = global_name(canonical_name(name), layout)
        if key not in full and tied_embeddings and key.endswith("output_layer.weight"):
            key = key.replace("output_layer.weight", "embedding.word_embeddings.weight")
        if key not in full:
            raise KeyError(f"no tensor for parameter {name!r} (global name {key!r}) in the source")
        dim = split_dim(canonical_name(name), param)
        if dim != partition_dim_of(key):
            raise AssertionError(f"{name}: megatron splits it along {dim}, the conversion table "
                                 f"says {partition_dim_of(key)}")
        piece = shard_tensor(full[key], name, dim, layout)
        if piece.shape != param.shape:
            raise ValueError(f"tensor {key!r}: expected shape {tuple(param.shape)} for this rank, "
                             f"found {tuple(piece.shape)} (from {tuple(full[key].shape)})")
        local[name] = piece
    return local


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], layout: RankLayout,
                         tied_embeddings: bool = False) -> None:
    """Copy the full model's tensors into this rank's parameters."""
    pieces = shard_state_dict(full, model, layout, tied_embeddings)
    for name, param in model.named_parameters():
        param.copy_(pieces[name])
