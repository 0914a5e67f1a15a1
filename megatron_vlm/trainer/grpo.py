"""The GRPO stage: rollout -> reward -> filter -> score -> update -> (next step) sync.

Colocated SPMD: every rank holds a slice of the trainer and an engine. Each DP rank generates its
share of the prompts, the samples are all-gathered over DP (group advantages and filtering need
whole groups), and the update deals rows to DP ranks again. Old log-probs are recomputed by the
trainer (default) and double as the weight-sync check: they are compared with the engine's own
log-probs for the same tokens every step, so a bad sync stops the run on the step it happens.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_vlm.rl.overlong import OverlongPenaltyConfig
from megatron_vlm.rl.sampling import DynamicSamplingConfig, informative_groups
from megatron_vlm.rollout.vllm_engine import VllmEngineConfig
from megatron_vlm.rollout.protocol import RolloutRequest, RolloutSample, SamplingParams
from megatron_vlm.rollout.weight_sync import check_logprobs, sync_weights
from megatron_vlm.rl.advantages import group_index_from_ids
from megatron_vlm.trainer.actor_batch import build_batch, response_logprobs
from megatron_vlm.trainer.rl_step import UpdateConfig, score_rows, sequence_advantages, update


@dataclass(kw_only=True)
class RolloutConfig:
    prompts_per_step: int = 16
    n: int = 8                       # samples per prompt (group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    bucket_mb: float = 16.0          # weight-sync bucket bound
    sync_check_bound: float = 1e-3   # max |engine - trainer| log-prob before the run stops
    old_logprobs: str = "trainer"    # trainer | engine
    drop_equal_groups: bool = True   # DAPO dynamic-sampling filter (groups with one reward value)

    def __post_init__(self):
        if self.prompts_per_step < 1 or self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("rollout.prompts_per_step, rollout.n, rollout.max_new_tokens must be >= 1")
        if self.old_logprobs not in ("trainer", "engine"):
            raise ValueError(f"rollout.old_logprobs must be trainer|engine, got {self.old_logprobs!r}")
        if self.bucket_mb <= 0 or self.sync_check_bound <= 0:
            raise ValueError("rollout.bucket_mb and rollout.sync_check_bound must be > 0")

    def sampling(self, stop_token_ids: list[int], seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, n=self.n,
                              stop_token_ids=stop_token_ids, seed=seed)


@dataclass(kw_only=True)
class RLConfig:
    """Engine choice and the rollout-shaping options of the recipes (`rl:` in a config)."""
    engine: str = "embedded"          # embedded (CPU, transformers) | vllm (GPU)
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)
    routing_replay: bool = False      # replay the engine's MoE routing in the trainer
    dynamic_sampling: DynamicSamplingConfig | None = None  # DAPO: draw until the batch is informative
    overlong: OverlongPenaltyConfig | None = None           # DAPO soft over-long penalty

    def __post_init__(self):
        if self.engine not in ("embedded", "vllm"):
            raise ValueError(f"rl.engine must be embedded or vllm, got {self.engine!r}")

    def check_supported(self) -> None:
        """Refuse options the stage runner does not apply yet rather than ignore them."""
        pending = [name for name, on in (("rl.engine=vllm", self.engine == "vllm"),
                                         ("rl.routing_replay", self.routing_replay),
                                         ("rl.dynamic_sampling", self.dynamic_sampling is not None),
                                         ("rl.overlong", self.overlong is not None)) if on]
        if pending:
            raise ValueError(f"{', '.join(pending)}: accepted by the config and implemented in "
                             f"rollout/ and rl/, but not yet applied by the GRPO stage (issue #5); "
                             f"refusing to run without them")


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


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def gather_over_dp(local: list) -> list:
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, local, group=group)
    return [item for part in out for item in part]


def generate_share(actor: Actor, engine, requests: list[RolloutRequest], sampling: SamplingParams):
    """This DP rank's prompts through the engine; every rank gets every sample back."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = requests[rank::dp]
    if sampling.seed is not None:
        sampling = SamplingParams(**{**sampling.__dict__, "seed": sampling.seed * 1009 + rank})
    local = engine.generate(mine, sampling) if mine else []
    return gather_over_dp(local)


def grpo_step(actor: Actor, engine, requests: list[RolloutRequest],
              reward_fn: Callable[[list[RolloutSample]], torch.Tensor], rollout: RolloutConfig,
              update_cfg: UpdateConfig, step: int) -> dict:
    timer = PhaseTimer()
    with timer("sync"):
        sync = sync_weights(actor.model, actor.rules, engine, int(rollout.bucket_mb * 2**20))
    with timer("rollout"):
        samples = generate_share(actor, engine, requests, rollout.sampling(actor.stop_token_ids, step))
        engine.sleep()
    with timer("reward"):
        rewards = reward_fn(samples).float()
    groups = group_index_from_ids([s.request_id for s in samples])
    keep = informative_groups(rewards, groups) if rollout.drop_equal_groups else torch.ones(len(samples), dtype=torch.bool)
    metrics = {"step": step, "reward": float(rewards.mean()), "samples": len(samples),
               "mixed_group_share": float(keep.float().mean()),
               "response_length": sum(len(s.response_ids) for s in samples) / max(1, len(samples)),
               "truncated_share": sum(s.finish_reason == "length" for s in samples) / max(1, len(samples)),
               "sync_seconds": sync.seconds, "sync_buckets": sync.buckets}
    kept = [s for s, k in zip(samples, keep.tolist()) if k]
    if kept:
        metrics.update(_train_on(actor, kept, rewards[keep], rollout, update_cfg, timer))
    rollout_tokens = sum(len(s.response_ids) for s in samples)
    metrics["rollout_tokens_per_s"] = rollout_tokens / max(timer.seconds["rollout"], 1e-9)
    metrics.update({f"time_{k}": v for k, v in timer.seconds.items()})
    return metrics


def _train_on(actor, samples, rewards, rollout, update_cfg, timer) -> dict:
    prepared = {s.request_id: actor.prepared(s.request_id) for s in samples}
    batch, images, patches = build_batch(samples, prepared, actor.pad_id, actor.spatial_merge_size)
    with timer("old_logprobs"):
        trainer_lp = score_rows(actor.model, batch, images, patches, update_cfg.temperature,
                                update_cfg.micro_batch_size)
    check = check_logprobs([s.logprobs for s in samples], response_logprobs(trainer_lp, batch),
                           rollout.sync_check_bound)
    old = trainer_lp if rollout.old_logprobs == "trainer" else _engine_logprobs(samples, batch)
    advantages = sequence_advantages(rewards, [s.request_id for s in samples], batch.loss_mask,
                                     update_cfg.advantage)
    with timer("update"):
        metrics = update([actor.ddp], actor.optimizer, actor.scheduler, batch, images, patches,
                         old, advantages, update_cfg)
    metrics.update(sync_logprob_max_abs=check.max_abs, sync_logprob_mean_abs=check.mean_abs,
                   train_tokens=int(batch.loss_mask.sum()),
                   train_tokens_per_s=float(batch.loss_mask.sum()) / max(timer.seconds["update"], 1e-9))
    return metrics


def _engine_logprobs(samples, batch) -> torch.Tensor:
    old = torch.zeros_like(batch.loss_mask)
    for row, sample in enumerate(samples):
        old[row][batch.loss_mask[row].bool()] = torch.tensor(sample.logprobs)
    return old
