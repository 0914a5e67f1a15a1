"""One rank of the routing-replay launch (2 gloo ranks): the embedded engine's routed experts
replayed by the trainer at EP=2 (alltoall and allgather), PP=2 and TP=2 with sequence parallelism.

Samples come from the embedded engine with return_routed_experts (images included, so vision
positions carry routes). Two engines: `exact` holds the trainer's weights; `flipped` has its router
weights perturbed, so it routes some tokens differently from the trainer. Per layout, with a model
built for replay and one without:
- exact samples, no replay: the trainer routes as the engine recorded (the recording lines up with
  the trainer's tokens: prompt, image placeholders, response);
- flipped samples, no replay / replay: routing_replay_match and the mean |logp_trainer - logp_engine|
  over response tokens (old log-probs, score_rows);
- EP=2 only: an update over several packed micro-batches dealt to the 2 DP ranks replays too, and a
  replay-built model scores a batch without routes exactly as the plain model;
- EP=2 only: grpo_step with rl.routing_replay (the engine asked for routes through its flag) and
  without it (routes measured only).
Writes the figures as JSON for test_routing_replay.py.
"""
import json
import sys

import torch

from megatron_vlm.config import OptimConfig
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.rl.config import RLConfig, RolloutConfig, UpdateConfig
from megatron_vlm.rl.losses import LossConfig
from megatron_vlm.rollout.embedded import EmbeddedEngine
from megatron_vlm.rollout.protocol import SamplingParams
from megatron_vlm.rollout.weight_sync import SyncCheckConfig
from megatron_vlm.trainer.actor_batch import build_batch, response_logprobs
from megatron_vlm.trainer.grpo import Actor, Rewards, grpo_step
from megatron_vlm.trainer.rl_step import score_rows, sequence_advantages, update
from megatron_vlm.trainer.routing_replay import moe_routers
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import build_policy, tiny_policy_weights

TEMPERATURE = 0.9
FLIP = 0.02  # std of the noise on the flipped engine's router weights (theirs: ~0.02)
OPTIM = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0)
LAYOUTS = {"ep2": ParallelConfig(ep=2, etp=1), "ep2_allgather": ParallelConfig(ep=2, etp=1, token_dispatcher="allgather"),
           "pp2": ParallelConfig(pp=2), "tp2_sp": ParallelConfig(tp=2),
           "cp2": ParallelConfig(cp=2)}  # each CP rank replays its chunks of every sample


def perturb_routers(engine, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in engine.routers:
            gate.weight.add_(torch.randn(gate.weight.shape, generator=g) * scale)


class FlippedRouters:
    """The embedded engine whose routers are perturbed after every weight sync."""

    def __init__(self, engine, scale: float):
        self.engine, self.scale = engine, scale

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def update_weights(self, buckets):
        count = self.engine.update_weights(buckets)
        perturb_routers(self.engine, self.scale, seed=3)
        return count


def mismatch(samples, trainer_lp, batch) -> float:
    trainer = response_logprobs(trainer_lp, batch)
    diffs = [abs(a - b) for s, t in zip(samples, trainer) for a, b in zip(s.logprobs, t)]
    return sum(diffs) / len(diffs)


def scored(model, batch, images, patches, samples, pack_tokens=None) -> tuple[float, float]:
    metrics = {}
    lp = score_rows(model, batch, images, patches, TEMPERATURE, micro_batch_size=4, pack_tokens=pack_tokens,
                    metrics=metrics)
    return metrics.get("routing_replay_match", -1.0), mismatch(samples, lp, batch)


def main():
    out_path = sys.argv[1]
    runtime = init_runtime(ParallelConfig(), seed=5)
    hf, family, rules, full = tiny_policy_weights(seed=2, aux_loss=False)
    requests, prepared = fixture_requests()
    weights = [[(n, t) for n, t in hf.state_dict().items()]]
    sampling = SamplingParams(temperature=TEMPERATURE, max_new_tokens=6, n=4, seed=9, stop_token_ids=[7])
    engines = {}
    for name, scale in (("exact", 0.0), ("flipped", FLIP)):
        engine = EmbeddedEngine(hf.config, prepare=lambda r: prepared[r.request_id], return_routed_experts=True)
        engine.update_weights(weights)
        perturb_routers(engine, scale, seed=3)
        engines[name] = engine
    samples = {name: engine.generate(requests, sampling) for name, engine in engines.items()}
    s0 = samples["exact"][0]
    routes = s0.metadata["routed_experts"]
    report = {"routes_shape": list(routes.shape), "routes_dtype": str(routes.dtype),
              "tokens": len(s0.prompt_ids) + len(s0.response_ids),
              "image_tokens": sum(int(prepared[s.request_id].mm_token_type_ids.sum()) for s in samples["exact"])}
    batches = {name: build_batch(s, prepared, pad_id=0, spatial_merge_size=2, with_routes=True)
               for name, s in samples.items()}

    for layout, parallel in LAYOUTS.items():
        set_layout(runtime, parallel, seed=5)
        plain = family.build(hf.config, parallel, "cpu", calculate_per_token_loss=True)
        _load(plain, full)
        replay = _load(family.build(hf.config, parallel, "cpu", calculate_per_token_loss=True,
                                    moe_enable_routing_replay=True), full)
        figures = {}
        figures["exact_match"], figures["exact_mismatch"] = scored(plain, *batches["exact"], samples["exact"])
        figures["off_match"], figures["off_mismatch"] = scored(plain, *batches["flipped"], samples["flipped"])
        figures["on_match"], figures["on_mismatch"] = scored(replay, *batches["flipped"], samples["flipped"])
        if layout == "pp2":
            figures.update(_recompute_replays(family, hf, full, parallel, batches["flipped"], samples["flipped"]))
        if layout == "ep2":
            figures.update(_ep2_extras(family, hf, full, parallel, plain, replay, batches["flipped"], samples["flipped"],
                                       prepared))
        report[layout] = figures
    set_layout(runtime, LAYOUTS["ep2"], seed=5)
    report["grpo"] = _grpo(family, hf, full, rules, prepared, requests)
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


def _load(model, full):
    from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict

    load_full_state_dict(model, full, RankLayout.current(model.config))
    return model


def _ep2_extras(family, hf, full, parallel, plain, replay, flipped, samples, prepared) -> dict:
    batch, images, patches = flipped
    out = {}
    # several packs per DP rank: the routes follow the pack order and the dealing of rows
    out["packed_on_match"], out["packed_on_mismatch"] = scored(replay, batch, images, patches, samples,
                                                               pack_tokens=int(batch.lengths.max()))
    # without routes a replay-built model routes as the plain one
    bare = build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)[0]
    lp_plain = score_rows(plain, bare, images, patches, TEMPERATURE, micro_batch_size=4)
    lp_replay = score_rows(replay, bare, images, patches, TEMPERATURE, micro_batch_size=4)
    out["no_routes_max_diff"] = float((lp_plain - lp_replay).abs().max())
    # the update: old log-probs with replay, one optimizer step over packed micro-batches
    cfg = UpdateConfig(temperature=TEMPERATURE, loss=LossConfig(name="dapo"), pack_tokens=int(batch.lengths.max()))
    old = score_rows(replay, batch, images, patches, TEMPERATURE, micro_batch_size=4)
    rewards = torch.tensor([float(sum(s.response_ids) % 5) for s in samples])
    adv = sequence_advantages(rewards, [s.request_id for s in samples], batch.loss_mask, cfg.advantage)
    # full activation recompute re-runs the routers in the backward (twice the router calls), where
    # REPLAY_BACKWARD gives each micro-batch its own routes again (checked per call at PP=2 below).
    # Gradients are not compared: recompute alone moves this VLM's grad norm by ~1.7% (replay off too)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    for name, overrides in (("update_off", {}), ("update_on", {"moe_enable_routing_replay": True}),
                            ("update_on_recompute", {"moe_enable_routing_replay": True, **recompute}),
                            ("update_off_recompute", recompute)):
        model, ddp, optimizer, scheduler = build_policy(family, hf, full, parallel, OPTIM, **overrides)
        calls = []
        for router in moe_routers(model):  # counts forwards and recomputes alike
            router.register_forward_hook(lambda *_: calls.append(1))
        metrics = update([ddp], optimizer, scheduler, batch, images, patches, old, adv, cfg)
        out[f"{name}_router_calls"] = len(calls)
        out[f"{name}_match"] = metrics.get("routing_replay_match_update", -1.0)
        out[f"{name}_loss"], out[f"{name}_grad_norm"] = metrics["loss"], metrics["grad_norm"]
    return out


def _recompute_replays(family, hf, full, parallel, flipped, samples) -> dict:
    """PP=2 1F1B with full recompute: stage 0 runs a second forward before the first backward, so
    each recompute in the backward must take its own micro-batch's routes (REPLAY_BACKWARD, first in
    first out), not the last forward's. Every router call's routing map is kept, by action."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    batch, images, patches = flipped
    model, ddp, optimizer, scheduler = build_policy(
        family, hf, full, parallel, OPTIM, moe_enable_routing_replay=True, recompute_granularity="full",
        recompute_method="uniform", recompute_num_layers=1)
    maps = {RouterReplayAction.REPLAY_FORWARD: [], RouterReplayAction.REPLAY_BACKWARD: []}
    router = moe_routers(model)[0]
    router.register_forward_hook(
        lambda r, _i, out: maps[r.router_replay.router_replay_action].append(out[1].clone()))
    cfg = UpdateConfig(temperature=TEMPERATURE, loss=LossConfig(name="dapo"), pack_tokens=int(batch.lengths.max()))
    old = score_rows(model, batch, images, patches, TEMPERATURE, micro_batch_size=4)
    for action in maps:
        maps[action].clear()
    rewards = torch.tensor([float(sum(s.response_ids) % 5) for s in samples])
    adv = sequence_advantages(rewards, [s.request_id for s in samples], batch.loss_mask, cfg.advantage)
    metrics = update([ddp], optimizer, scheduler, batch, images, patches, old, adv, cfg)
    forward, backward = maps[RouterReplayAction.REPLAY_FORWARD], maps[RouterReplayAction.REPLAY_BACKWARD]
    return {"recompute_forwards": len(forward), "recompute_backwards": len(backward),
            "recompute_same_routes": len(forward) == len(backward) and all(
                bool((f == b).all()) for f, b in zip(forward, backward)),
            "recompute_distinct_packs": len({tuple(f.nonzero().flatten().tolist()) for f in forward}),
            "recompute_match": metrics.get("routing_replay_match_update", -1.0)}


def _grpo(family, hf, full, rules, prepared, requests) -> dict:
    loose = SyncCheckConfig(mean_abs=10.0, quantile_abs=10.0, kl=10.0, bulk_kl=10.0)  # the flipped engine disagrees
    rollout = RolloutConfig(prompts_per_step=3, n=4, max_new_tokens=6, temperature=TEMPERATURE, bucket_mb=0.1,
                            drop_equal_groups=False, sync_check=loose)
    cfg = UpdateConfig(temperature=TEMPERATURE, micro_batch_size=4, loss=LossConfig(name="dapo"))
    out = {}
    for name, on in (("off", False), ("on", True)):
        model, ddp, optimizer, scheduler = build_policy(family, hf, full, LAYOUTS["ep2"], OPTIM,
                                                        moe_enable_routing_replay=on)
        actor = Actor(model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler, rules=rules,
                      prepared=prepared.__getitem__, pad_id=0, spatial_merge_size=2, stop_token_ids=[7])
        engine = FlippedRouters(EmbeddedEngine(hf.config, prepare=lambda r: prepared[r.request_id],
                                               return_routed_experts=True), scale=FLIP)
        rl = RLConfig(routing_replay=on)
        rl.check(rollout)
        metrics = grpo_step(actor, engine, lambda: list(requests),
                            lambda s: Rewards(torch.tensor([float(sum(x.response_ids) % 5) for x in s]),
                                              torch.zeros(len(s)), {}),
                            rollout, cfg, step=1, rl=rl)
        out[f"{name}_match"] = metrics.get("routing_replay_match", -1.0)
        out[f"{name}_update_match"] = metrics.get("routing_replay_match_update", -1.0)
        out[f"{name}_sync_mean_abs"] = metrics.get("sync_logprob_mean_abs", -1.0)
    return out


if __name__ == "__main__":
    main()
