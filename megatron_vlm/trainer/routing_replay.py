"""MoE routing replay (R3): the trainer's forward sends each token to the experts the rollout engine
used for it, so that old log-probs and the update see the engine's routing (Megatron-LM#4168).

Where the routes come from: the engine returns, per sample, int [prompt_len + response_len (or one
less: the final response token is never run by the engine), moe_layers, top_k] in
`sample.metadata["routed_experts"]` (rollout/embedded.py records them from transformers' routers,
rollout/vllm_engine.py takes vLLM's). `actor_batch.build_batch` lays them into
`SequenceBatch.routed_experts` [B, S, L, k] (-1 where the engine gave none) and `pack_rows` packs
them with the tokens, so packing order, tail padding and the dealing of rows to DP ranks follow by
construction (the masked stand-in micro-batch of a DP rank without rows gets all -1).

At the forward (`replay_routes`, entered by `actor_batch.forward_hidden`), each rank cuts the pack's
routes [T, L, k] to what its routers see:
- PP: a stage's routers are matched to the engine's MoE-layer index by their global layer number
  (megatron's `moe_layer_freq` says which layers are MoE); a stage gets only its layers' routes.
- TP with sequence parallelism: megatron's router runs on the MoE layer's input, which is this TP
  rank's SP slice [T/tp] (the scatter happens at the embedding), so rank r takes tokens
  [r T/tp, (r + 1) T/tp).
- CP: the pack cuts its routes for this CP rank as it cuts the tokens (`PackedMicroBatch.local`:
  chunks r and 2*CP-1-r of every sample, `parallel.batching.thd_cp_index`), before the SP cut here;
  `replay_routes` receives [T / cp, L, k].
- EP (alltoall and allgather dispatchers): nothing to cut: routing happens before the dispatch, on
  this rank's own tokens, with global expert ids; both dispatchers read the router's routing map.
- Vision tokens: their positions in the sequence carry the routes the engine used for them.
-1 entries get the filler route [0, 1, ..., k-1] (k distinct experts); those tokens (the last
response token, tail padding, the stand-in) feed no log-prob the loss uses.

Replay is megatron-core's RouterReplay (`TransformerConfig.moe_enable_routing_replay`, set at build
from `rl.routing_replay`): the per-layer target indices are set on this model's own routers (not
RouterReplay's global list, which also holds every other model's, e.g. a reference policy's), the
action is REPLAY_FORWARD during the forward step and REPLAY_BACKWARD after it (none after a forward
without grad), so that a recompute in the backward (activation checkpointing) pops each
micro-batch's indices first in, first out, as megatron's schedules run backward passes in forward
order. A model built without the flag, or a
batch without routes, routes as usual.

Metric `routing_replay_match`: the share of (token, layer) routes of the trainer's forward whose
expert set equals the engine's, read from the routing map each router returns (a forward hook,
so it measures what the forward used, replayed or not), over the tokens the engine routed. Counts
stay on the device until `route_match_metrics`, which sums them over every rank (each (token,
layer) lives on one rank: DP rows, SP slices and PP layers are disjoint) and clears the replay state.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_vlm.parallel.devices import collective_device

_COUNTS = "_route_match_counts"  # router attribute: [matched, routed] tensor on the model's device


def moe_routers(model) -> list:
    """This model's megatron routers (this stage's MoE layers), in layer order."""
    from megatron.core.transformer.moe.router import Router

    return sorted((m for m in model.modules() if isinstance(m, Router)), key=lambda r: r.layer_number)


def moe_layer_slots(routers, config) -> list[int]:
    """Each router's index among the model's MoE layers (the engine's layer axis)."""
    freq = config.moe_layer_freq
    pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(config.num_layers)]
    moe_before = [sum(pattern[:i]) for i in range(len(pattern))]
    return [moe_before[r.layer_number - 1] for r in routers]  # layer_number: global, 1-based


def local_routes(routes: torch.Tensor, routers, config) -> torch.Tensor:
    """A pack's routes for this CP rank [T / cp, L, k] (all T without CP) -> what this rank's
    routers see [T_local, L_local, k]."""
    from megatron.core import parallel_state as ps

    if config.sequence_parallel:
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        size = routes.shape[0] // tp
        routes = routes[rank * size:(rank + 1) * size]
    return routes[:, moe_layer_slots(routers, config)]


@contextmanager
def replay_routes(model, routes: torch.Tensor | None):
    """Around one micro-batch's forward: replay `routes` [T, L, k] (this pack's, -1 = none) where the
    model was built for replay, and count how many routes the forward took equal the engine's."""
    routers = moe_routers(model) if routes is not None else []
    if not routers:
        yield
        return
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    local = local_routes(routes, routers, routers[0].config).long()  # [T_local, L_local, k]
    routed = local[..., 0] >= 0                                        # [T_local, L_local]
    filler = torch.arange(local.shape[-1], device=local.device)
    targets = torch.where(routed[..., None], local, filler)
    hooks = []
    for i, router in enumerate(routers):
        if router.router_replay is not None:
            router.router_replay.set_target_indices(targets[:, i].contiguous())
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        hooks.append(router.register_forward_hook(_counter(targets[:, i], routed[:, i])))
    # after the forward: a recompute in this micro-batch's backward takes its routes again; a
    # forward without grad has no backward, so the routers go back to routing by themselves
    after = RouterReplayAction.REPLAY_BACKWARD if torch.is_grad_enabled() else None
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for router in routers:
            if router.router_replay is not None:
                router.router_replay.router_replay_action = after


def _counter(targets: torch.Tensor, routed: torch.Tensor):
    """Forward hook on a router: add (routes equal to `targets`, routed tokens) to its counts."""
    def hook(router, _inputs, output):
        routing_map = output[1]                                        # [T_local, E] bool
        if routing_map.shape[0] != targets.shape[0]:
            raise ValueError(f"routing replay: router {router.layer_number} sees {routing_map.shape[0]} "
                             f"tokens, the pack's routes cut for this rank have {targets.shape[0]}")
        expected = torch.zeros_like(routing_map).scatter(1, targets.to(routing_map.device), True)
        same = (routing_map == expected).all(-1) & routed.to(routing_map.device)
        counts = torch.stack([same.sum(), routed.sum().to(same.device)])
        previous = getattr(router, _COUNTS, None)
        setattr(router, _COUNTS, counts if previous is None else previous + counts)
    return hook


def route_match_metrics(models, any_routes: bool) -> dict[str, float]:
    """{"routing_replay_match": share} over every rank's counts since the last call, and the replay
    state cleared. Collective over the world when `any_routes` (which every rank must agree on: it
    follows from the batch, the same everywhere); {} otherwise."""
    routers = [r for m in models for r in moe_routers(m)]
    for router in routers:
        if router.router_replay is not None:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
    if not any_routes:
        return {}
    device = collective_device()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for router in routers:
        counts = getattr(router, _COUNTS, None)
        if counts is not None:
            total += counts.to(device, torch.float64)
            setattr(router, _COUNTS, None)
    torch.distributed.all_reduce(total)
    matched, routed = total.tolist()
    return {"routing_replay_match": matched / routed} if routed else {}


def merge_forced_routes(first: torch.Tensor, continued: torch.Tensor, tokens: int) -> torch.Tensor:
    """The routes of a forced-answer sample ([tokens or tokens - 1, L, k]).

    GLM-4.5V's forced answer (trainer/grpo.py `force_answers`) re-submits prompt + response + the
    inserted delimiter and lets the engine continue: `continued` covers that whole sequence plus the
    answer (`tokens` in all, less its final token), `first` the original generation (prompt +
    response, less the last response token). The original tokens keep the routes of the pass that
    sampled them, the rest (the last response token, the inserted ids, the answer) take the
    continuation's: the routes the engine used for every token whose log-prob it reported."""
    first, continued = torch.as_tensor(first), torch.as_tensor(continued)
    if continued.shape[0] not in (tokens - 1, tokens) or first.shape[0] > continued.shape[0] \
            or first.shape[1:] != continued.shape[1:]:
        raise ValueError(f"forced answer routes: first {list(first.shape)} and continuation "
                         f"{list(continued.shape)} do not cover one sequence of {tokens} tokens")
    return torch.cat([first, continued[first.shape[0]:]])
