"""Rules between Hugging Face tensors and full (unsharded) megatron tensors, in both directions.

A `Rule` ties a group of HF names to a group of megatron names with a pair of pure functions, so
conversion streams one rule at a time (memory: the tensors of one rule, at most one layer's fused
experts) and the same rules serve import, export and the rollout engines' weight sync:
  same           one tensor, same values (norms, embeddings, vision weights)
  qkv            q, k, v -> megatron's grouped [q heads of group g; k_g; v_g] per query group
  gate_up        gate, up -> SwiGLU fc1 [gate; up]
  fused_experts  one [E, ...] tensor -> E per-expert tensors; the Hub layout of Qwen3-VL-MoE stores
                 gate_up_proj as [E, H, 2I] and down_proj as [E, I, H] (transposed against
                 nn.Linear), transformers keeps [E, 2I, H] / [E, H, I] in memory and its
                 save_pretrained writes that; both are read, the Hub layout is written.
Megatron names are those of a TP=PP=EP=1 model with the local layer spec
(checkpoint/sharding.py cuts them per rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    mcore: tuple[str, ...]
    to_mcore: Callable[[Tensors], Tensors]
    to_hf: Callable[[Tensors], Tensors]


def same(hf: str, mcore: str) -> Rule:
    return Rule((hf,), (mcore,), lambda t: [t[0]], lambda t: [t[0]])


def qkv(q: str, k: str, v: str, mcore: str, heads: int, groups: int, head_dim: int) -> Rule:
    per_group = heads // groups

    def to_mcore(t: Tensors) -> Tensors:
        rest = t[0].shape[1:]
        qg = t[0].reshape(groups, per_group * head_dim, *rest)
        kg = t[1].reshape(groups, head_dim, *rest)
        vg = t[2].reshape(groups, head_dim, *rest)
        return [torch.cat([qg, kg, vg], dim=1).reshape(groups * (per_group + 2) * head_dim, *rest)]

    def to_hf(t: Tensors) -> Tensors:
        rest = t[0].shape[1:]
        grouped = t[0].reshape(groups, (per_group + 2) * head_dim, *rest)
        qg, kg, vg = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [x.reshape(-1, *rest).contiguous() for x in (qg, kg, vg)]

    return Rule((q, k, v), (mcore,), to_mcore, to_hf)


def gate_up(gate: str, up: str, mcore: str) -> Rule:
    return Rule((gate, up), (mcore,), lambda t: [torch.cat(t, dim=0)],
                lambda t: [x.contiguous() for x in t[0].chunk(2, dim=0)])


def fused_experts(hf: str, mcore: list[str], linear_shape: tuple[int, int]) -> Rule:
    """[E, in, out] (Hub) or [E, out, in] (nn.Linear) <-> E tensors [out, in]; writes the Hub layout.

    When out == in the layouts cannot be told apart by shape and the Hub layout is assumed.
    """
    out_features, in_features = linear_shape

    def to_mcore(t: Tensors) -> Tensors:
        fused = t[0]
        if fused.shape[1:] == (in_features, out_features):
            fused = fused.transpose(1, 2)
        elif fused.shape[1:] != (out_features, in_features):
            raise ValueError(f"tensor {hf!r}: expected shape [{len(mcore)}, {in_features}, "
                             f"{out_features}] (Hub layout) or [{len(mcore)}, {out_features}, "
                             f"{in_features}], found {list(fused.shape)}")
        return [e.contiguous() for e in fused.unbind(0)]

    def to_hf(t: Tensors) -> Tensors:
        return [torch.stack(t).transpose(1, 2).contiguous()]

    return Rule((hf,), tuple(mcore), to_mcore, to_hf)


def hf_to_mcore(rules: list[Rule], get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream full megatron tensors, reading HF tensors through `get(name)` one rule at a time."""
    for rule in rules:
        for name, tensor in zip(rule.mcore, rule.to_mcore([get(n) for n in rule.hf])):
            yield name, tensor


def mcore_to_hf(rules: list[Rule], get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF tensors, reading full megatron tensors through `get(name)` one rule at a time."""
    for rule in rules:
        for name, tensor in zip(rule.hf, rule.to_hf([get(n) for n in rule.mcore])):
            yield name, tensor


def check_hf_keys(rules: list[Rule], available: set[str], source: str) -> None:
    """Every HF tensor the rules need is there and nothing unexplained is left over."""
    needed = {name for rule in rules for name in rule.hf}
    missing = sorted(needed - available)
    if missing:
        raise KeyError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    unexpected = sorted(available - needed)
    if unexpected:
        raise KeyError(f"{source}: {len(unexpected)} tensors no rule accounts for (a different "
                       f"architecture or config?), e.g. {unexpected[:5]}")

