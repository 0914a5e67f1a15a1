"""The GRPO stage: rollout -> reward -> filter -> score -> update -> (next step) sync.

Colocated SPMD: every rank holds a slice of the trainer and an engine. Each engine replica generates
its share of the prompts, the samples are all-gathered (group advantages and filtering need whole
groups), and the update deals rows to DP ranks again. Rewards may carry DAPO's soft over-long
penalty; groups whose rewards tie are dropped, or (dynamic sampling) more prompts are drawn until
the batch holds enough informative groups; truncated responses may leave the loss; reference
log-probs come from the frozen `ReferencePolicy` when the loss has a KL term. Old log-probs are
the trainer's (default) and double as the weight-sync check: they are compared with the engine's
own log-probs for the same tokens every step, so a bad sync stops the run on the step it happens.
With one optimizer step per batch they are the update forward's own (`update.on_policy_old_logprobs`),
checked before the optimizer step; otherwise a scoring pass computes them first.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch

from megatron_vlm.rl.advantages import group_index_from_ids
from megatron_vlm.rl.config import RLConfig, RolloutConfig, UpdateConfig
from megatron_vlm.rl.overlong import (ForcedAnswerConfig, merge_forced_answer, plan_forced_answers,
                                      soft_overlong_penalty)
from megatron_vlm.rl.sampling import RolloutGroup, fill_dynamic_batch, informative_groups, is_informative
from megatron_vlm.rollout.protocol import RolloutRequest, RolloutSample, SamplingParams
from megatron_vlm.rollout.weight_sync import check_logprobs, precision, sync_weights
from megatron_vlm.trainer.actor_batch import build_batch, response_logprobs
from megatron_vlm.trainer.rl_step import score_rows, sequence_advantages, update
from megatron_vlm.trainer.routing_replay import merge_forced_routes


@dataclass
class Actor:
    """What the stage needs of the trainer side."""
    model: torch.nn.Module          # the unwrapped VisionLanguageModel (scoring, weight stream)
    ddp: torch.nn.Module            # megatron DDP wrapper (updates)
    optimizer: object
    scheduler: object
    rules: list                     # HF conversion rules of the family
    prepared: Callable[[str], object]  # request id -> its processor output (a Prepared)
    pad_id: int
    spatial_merge_size: int
    stop_token_ids: list[int] = field(default_factory=list)
    reference: object | None = None  # a ReferencePolicy when the loss has a KL term
    tokenizer: object | None = None  # HF tokenizer (forced answers decode and encode text)
    image_token_id: int | None = None  # the image placeholder (a response holding it is not continued)


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def engine_replica(engine) -> tuple[int, int]:
    """(replicas, this rank's replica): prompts are dealt by engine replica. A vLLM engine spans
    its own TP group (`engine.replicas`); the embedded engine is one per rank, and ranks that share
    a trainer DP rank (its TP / CP / PP peers) act as one replica and sample the same."""
    from megatron.core import parallel_state as ps

    if hasattr(engine, "replica"):
        return engine.replicas, engine.replica
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def generate_share(actor: Actor, engine, requests: list[RolloutRequest], sampling: SamplingParams):
    """This replica's prompts through the engine; every rank gets every sample back, in the order
    of `requests` (each replica's samples once, however many ranks it spans)."""
    replicas, replica = engine_replica(engine)
    mine = requests[replica::replicas]
    if sampling.seed is not None:
        sampling = SamplingParams(**{**sampling.__dict__, "seed": sampling.seed * 1009 + replica})
    local = engine.generate(mine, sampling) if mine else []
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (replica, local))
    by_replica = dict(reversed(gathered))  # one copy per replica (the first rank's)
    order = {r.request_id: i for i, r in enumerate(requests)}
    return sorted((s for part in by_replica.values() for s in part),
                  key=lambda s: (order[s.request_id], s.index))


class Rewards(NamedTuple):
    values: torch.Tensor  # [S] what the advantages see: normalised per task, weighted
    raw: torch.Tensor     # [S] the verifiers' / reward model's scores (the curves)
    metrics: dict         # per-task means, failures, ...


RewardFn = Callable[[list[RolloutSample]], Rewards]


def grpo_step(actor: Actor, engine, draw: Callable[[], list[RolloutRequest]], reward_fn: RewardFn,
              rollout: RolloutConfig, update_cfg: UpdateConfig, step: int,
              rl: RLConfig | None = None) -> dict:
    """One RL step: sync, rollouts (more draws under dynamic sampling), rewards, filters,
    old / reference log-probs, update. `draw()` returns the next `prompts_per_step` prompts."""
    rl = rl or RLConfig()
    timer = PhaseTimer()
    with timer("sync"):
        sync = sync_weights(actor.model, actor.rules, engine, int(rollout.bucket_mb * 2**20))
    metrics = {"step": step, "sync_seconds": sync.seconds, "sync_buckets": sync.buckets}
    seen: list[RolloutSample] = []
    seen_rewards: list[torch.Tensor] = []
    seen_raw: list[torch.Tensor] = []
    reward_metrics: dict = {}

    def draw_groups() -> list[RolloutGroup]:
        nonlocal reward_metrics
        with timer("rollout"):
            seed = step * 64 + len(seen_rewards)
            requests = draw()
            samples = generate_share(actor, engine, requests, rollout.sampling(actor.stop_token_ids, seed))
            if rl.forced_answer is not None:
                samples, forced = force_answers(actor, engine, requests, samples, rl.forced_answer,
                                                rollout, seed)
                metrics["forced_answers"] = metrics.get("forced_answers", 0) + forced
        with timer("reward"):
            scored = reward_fn(samples)
            rewards, reward_metrics = scored.values.float(), scored.metrics
            if rl.overlong is not None:
                lengths = torch.tensor([len(s.response_ids) for s in samples])
                rewards = rewards + soft_overlong_penalty(lengths, rl.overlong)
        seen.extend(samples)
        seen_rewards.append(rewards)
        seen_raw.append(scored.raw.float())
        return _groups(samples, rewards)

    if rl.dynamic_sampling is not None:
        dynamic = rl.dynamic_sampling
        if dynamic.batch_groups is None:  # the batch the prompts make, refilled with informative groups
            dynamic = replace(dynamic, batch_groups=rollout.prompts_per_step)
        groups, stats = fill_dynamic_batch(draw_groups, dynamic)
        metrics.update({f"dynamic_{k}": v for k, v in stats.items()})
    else:
        groups = draw_groups()
        if rollout.drop_equal_groups:
            groups = [g for g in groups if is_informative(g.rewards)]
    engine.sleep()
    rewards = torch.cat(seen_rewards)
    metrics.update(reward_metrics)
    metrics.update({"reward": float(torch.cat(seen_raw).mean()), "reward_shaped": float(rewards.mean()),
                    "samples": len(seen),
                    "mixed_group_share": float(informative_groups(
                        rewards, group_index_from_ids([s.request_id for s in seen])).float().mean()),
                    "response_length": sum(len(s.response_ids) for s in seen) / max(1, len(seen)),
                    "truncated_share": sum(s.finish_reason == "length" for s in seen) / max(1, len(seen))})
    kept = [s for g in groups for s in g.payload]
    kept_rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float)
    if kept:
        metrics.update(_train_on(actor, kept, kept_rewards, rollout, update_cfg, rl, timer, engine.dtype))
    rollout_tokens = sum(len(s.response_ids) for s in seen)
    metrics["rollout_tokens_per_s"] = rollout_tokens / max(timer.seconds["rollout"], 1e-9)
    metrics.update({f"time_{k}": v for k, v in timer.seconds.items()})
    return metrics


def force_answers(actor: Actor, engine, requests: list[RolloutRequest], samples: list[RolloutSample],
                  cfg: ForcedAnswerConfig, rollout: RolloutConfig, seed: int) -> tuple[list[RolloutSample], int]:
    """GLM-4.5V's forced answer: each sample cut off inside its think block gets the delimiter
    appended and the model continues within `cfg.answer_budget` tokens; the inserted tokens are
    masked out of the loss (and out of the sync check: the engine did not sample them)."""
    if actor.tokenizer is None:
        raise ValueError("rl.forced_answer needs the actor's tokenizer")
    tokenizer = actor.tokenizer
    by_id = {r.request_id: r for r in requests}
    # A response holding the image placeholder cannot be re-submitted as a prompt (the processor
    # would expand it as an image): such a sample keeps its truncated response, as without forcing.
    continuable = [actor.image_token_id not in s.response_ids for s in samples]
    plans = plan_forced_answers(
        [by_id[s.request_id].prompt_ids for s in samples], [s.response_ids for s in samples],
        [tokenizer.decode(s.response_ids, skip_special_tokens=False) for s in samples],
        [s.finish_reason == "stop" or not ok for s, ok in zip(samples, continuable)],
        lambda text: tokenizer(text, add_special_tokens=False).input_ids, cfg)
    if not plans:
        return samples, 0
    continuations = []
    for plan in plans:  # unexpanded prompt + response + delimiter: the engine's processor expands it
        sample, request = samples[plan.index], by_id[samples[plan.index].request_id]
        continuations.append(RolloutRequest(f"{sample.request_id}/forced{sample.index}/{seed}",
                                            plan.prompt_ids, request.images,
                                            {**request.metadata, "ephemeral": True}))
    sampling = SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                              max_new_tokens=cfg.answer_budget, n=1,
                              stop_token_ids=actor.stop_token_ids, seed=seed * 7 + 1)
    answers = generate_share(actor, engine, continuations, sampling)
    out = list(samples)
    for plan, answer in zip(plans, answers):
        sample = samples[plan.index]
        ids, mask = merge_forced_answer(sample.response_ids, plan, answer.response_ids)
        metadata = {**sample.metadata, "forced_answer": True}
        if "routed_experts" in sample.metadata:  # routing replay: the continuation's routes after the first's
            metadata["routed_experts"] = merge_forced_routes(
                sample.metadata["routed_experts"], answer.metadata["routed_experts"], len(sample.prompt_ids) + len(ids))
        out[plan.index] = replace(
            sample, response_ids=ids, response_mask=mask, finish_reason=answer.finish_reason,
            logprobs=sample.logprobs + [0.0] * len(plan.inserted_ids) + answer.logprobs,
            seconds=sample.seconds + answer.seconds, metadata=metadata)
    return out, len(plans)


def _groups(samples: list[RolloutSample], rewards: torch.Tensor) -> list[RolloutGroup]:
    """Samples grouped by prompt, in first-seen order."""
    members: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        members.setdefault(sample.request_id, []).append(i)
    return [RolloutGroup(rid, [float(rewards[i]) for i in idx], [samples[i] for i in idx])
            for rid, idx in members.items()]


def _train_on(actor, samples, rewards, rollout, update_cfg, rl, timer, engine_dtype) -> dict:
    prepared = {s.request_id: actor.prepared(s.request_id) for s in samples}
    # the engine's routes: replayed under rl.routing_replay, else only measured when it returns them
    with_routes = rl.routing_replay or all("routed_experts" in s.metadata for s in samples)
    batch, images, patches = build_batch(samples, prepared, actor.pad_id, actor.spatial_merge_size, with_routes)
    routing: dict = {}
    bounds = rollout.sync_check.resolved(precision(engine_dtype, actor.model.config.params_dtype))
    engine_sampled = [s.sampled_logprobs() for s in samples]
    # on-policy: pi_old is the update forward's own (the same weights and packs a scoring pass
    # would use), and the sync check runs on it before the optimizer step
    in_update = (update_cfg.on_policy_old_logprobs and rollout.old_logprobs == "trainer"
                 and update_cfg.optimizer_steps == 1 and update_cfg.rollout_correction is None)
    checks: list = []
    response_mask = batch.loss_mask.clone()  # the sampled tokens, before mask_truncated
    if in_update:
        old = None
    else:
        with timer("old_logprobs"):
            trainer_lp = score_rows(actor.model, batch, images, patches, update_cfg.temperature,
                                    update_cfg.micro_batch_size, metrics=routing)
        checks.append(check_logprobs(engine_sampled, response_logprobs(trainer_lp, batch), bounds))
        old = trainer_lp if rollout.old_logprobs == "trainer" else _engine_logprobs(samples, batch)
    engine_lp = None
    if update_cfg.rollout_correction is not None:  # decoupled PPO: behaviour = engine, proximal = trainer
        if rollout.old_logprobs != "trainer":
            raise ValueError("update.rollout_correction needs rollout.old_logprobs = trainer (with engine "
                             "old log-probs the correction ratio is 1 on every token)")
        engine_lp = _engine_logprobs(samples, batch)
    ref = None
    if update_cfg.loss.kl_type != "none":
        if actor.reference is None:
            raise ValueError(f"update.loss.kl_type={update_cfg.loss.kl_type!r} needs a reference "
                             f"policy, but the actor has none")
        with timer("ref_logprobs"):
            ref = actor.reference.score(batch, images, patches, update_cfg.temperature,
                                        update_cfg.micro_batch_size)
    advantages = sequence_advantages(rewards, [s.request_id for s in samples], batch.loss_mask,
                                     update_cfg.advantage)
    report = {**(checks[0].metrics() if checks else {}), **routing}
    if rl.mask_truncated:  # the advantages above still saw them: only their tokens leave the loss
        truncated = torch.tensor([s.finish_reason == "length" for s in samples])
        batch.loss_mask = batch.loss_mask * (~truncated).float()[:, None]
        report["masked_truncated"] = int(truncated.sum())
        if not batch.loss_mask.any():
            return report  # nothing left to learn from (every kept response was cut off)
    def check(trainer_lp):  # on-policy: the update's log-probs, before its optimizer step
        checks.append(check_logprobs(engine_sampled, response_logprobs(trainer_lp, batch, response_mask), bounds))

    with timer("update"):
        metrics = update([actor.ddp], actor.optimizer, actor.scheduler, batch, images, patches,
                         old, advantages, update_cfg, ref_logprobs=ref, engine_logprobs=engine_lp,
                         max_response_len=rollout.max_new_tokens, on_logprobs=check if in_update else None)
    if in_update:
        report.update(checks[0].metrics())
        if "routing_replay_match_update" in metrics:  # the update's forward was the old log-prob pass
            report["routing_replay_match"] = metrics["routing_replay_match_update"]
    metrics.update(report, train_tokens=int(batch.loss_mask.sum()),
                   train_tokens_per_s=float(batch.loss_mask.sum()) / max(timer.seconds["update"], 1e-9))
    return metrics


def _engine_logprobs(samples, batch) -> torch.Tensor:
    old = torch.zeros_like(batch.loss_mask)
    for row, sample in enumerate(samples):
        old[row][batch.loss_mask[row].bool()] = torch.tensor(sample.sampled_logprobs())
    return old
