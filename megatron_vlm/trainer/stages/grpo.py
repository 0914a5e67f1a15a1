"""The GRPO stage (and its DAPO / GSPO / Intern-S1 variants, by `update.loss`): rollout -> reward
-> filter -> score -> update, in `trainer.grpo.grpo_step`; the prompts come from the run's mix,
which sees each step's raw rewards (difficulty-adaptive shares, curriculum). Beside the per-task
reward, the step logs the mean raw reward of each question kind (`reward/by_kind/<kind>`) and its
share of well-formed responses (`reward/by_kind/<kind>/well_formed`)."""
from __future__ import annotations

import torch

from megatron_vlm.trainer.evaluation import mean_by, sample_kind
from megatron_vlm.trainer.grpo import Rewards, grpo_step
from megatron_vlm.trainer.samples import write_samples
from megatron_vlm.trainer.stages import Stage, register_stage, samples_due


@register_stage("grpo")
class GRPOStage(Stage):
    def __init__(self, ctx, cfg, offset: int = 0):
        super().__init__(ctx, cfg, offset)
        self.scored: list = []  # (request, raw reward) of this step, for the prompt mix
        self.formed: list = []  # whether each of them was well formed
        self.first_draw = None  # (samples, reward result) of the step's first draw, to write out

    def step(self, step: int) -> dict:
        cfg = self.ctx.cfg
        metrics = grpo_step(self.ctx.actor, self.ctx.engine, self.ctx.draw, self.rewards, cfg.rollout,
                            cfg.update, step, cfg.rl)
        metrics.update(observe_mix(self.ctx, self.scored))
        metrics.update(reward_by_kind(self.scored, cfg.vlm.kinds.column, self.formed))
        if samples_due(self, step):
            save_samples(self.ctx, step + self.offset, *self.first_draw)
        self.scored, self.formed, self.first_draw = [], [], None
        return metrics

    def rewards(self, samples) -> Rewards:
        _, result = self.ctx.score(samples)
        self.scored += [(self.ctx.data.by_id[s.request_id], raw) for s, raw in zip(samples, result.raw)]
        self.formed += result.well_formed or [True] * len(samples)
        self.first_draw = self.first_draw or (samples, result)
        return Rewards(torch.tensor(result.rewards, dtype=torch.float),
                       torch.tensor(result.raw, dtype=torch.float), result.metrics)


def save_samples(ctx, step: int, samples, result) -> None:
    write_samples(ctx.out_dir, step, samples, result, ctx.data.by_id, ctx.text, ctx.cfg.train.samples.count,
                  ctx.cfg.update.advantage)


def reward_by_kind(scored: list, column: str, well_formed: list | None = None) -> dict:
    """`reward/by_kind/<kind>`: the mean raw reward of the step's samples of each kind (every draw
    of the step), when the prompts name a kind (`column`) or span several tasks; with
    `well_formed` (one flag per sample) also `reward/by_kind/<kind>/well_formed`, their share."""
    kinds = [sample_kind(request.metadata, column) for request, _ in scored]
    if not (any(column in request.metadata for request, _ in scored) or len(set(kinds)) > 1):
        return {}
    metrics = {f"reward/by_kind/{kind}": mean for kind, mean in mean_by(kinds, [raw for _, raw in scored]).items()}
    if well_formed is not None:
        metrics.update({f"reward/by_kind/{kind}/well_formed": share
                        for kind, share in mean_by(kinds, [float(w) for w in well_formed]).items()})
    return metrics


def observe_mix(ctx, scored: list) -> dict:
    """Feed a step's (request, raw reward) pairs to the prompt mix; its metrics."""
    return ctx.data.mix.observe(scored)
