"""Stage kinds: one registered object per kind (`@register_stage("grpo")`), each in its own module.

    stage = build_stage(stage_cfg, ctx)      # the kind looked up by name; unknown kinds list the known
    stage.begin()                            # entering the stage: its lr, optimizer reset, pi_ref
    metrics = stage.step(step)               # one optimizer step (or none, where nothing is kept)
    state = stage.state_dict(); stage.load_state_dict(state)   # what a checkpoint keeps of it

A stage takes what it needs from the `RunContext` (model, optimizer, engine, scorer, data) and
builds none of it. `Stage` holds what every kind does on entry; the run loop never branches on
the kind.
"""
from __future__ import annotations

from megatron_vlm.rl.registry import Registry
from megatron_vlm.trainer.megatron_step import reset_optimizer_state, set_constant_lr

STAGES: Registry = Registry("stage kind")
register_stage = STAGES.register


class Stage:
    """The part every stage kind shares: entry into the stage, and an empty state."""

    def __init__(self, ctx, cfg, offset: int = 0):
        self.ctx, self.cfg = ctx, cfg
        self.offset = offset  # the steps of the stages before this one: step + offset is the run's step

    def begin(self) -> None:
        """Enter the stage: its own constant lr, fresh Adam moments if asked, pi_ref = the policy
        entering it. A stage resumed from a checkpoint is not entered again: the checkpoint holds
        the schedule, optimizer state and reference policy as they were."""
        actor = self.ctx.actor
        if self.cfg.lr is not None:
            set_constant_lr(actor.optimizer, actor.scheduler, self.cfg.lr)
        if self.cfg.reset_optimizer:
            reset_optimizer_state(actor.optimizer)
        if actor.reference is not None:
            actor.reference.reset_from(actor.model)  # pi_ref = the policy entering the stage

    def step(self, step: int) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"a {self.cfg.kind} stage keeps no state, but the checkpoint has {sorted(state)}")


def build_stage(cfg, ctx, offset: int = 0) -> Stage:
    return STAGES.get(cfg.kind)(ctx, cfg, offset)


def build_stages(ctx) -> list[Stage]:
    """The run's stages, each knowing where its steps fall in the run's count."""
    stages, offset = [], 0
    for cfg in ctx.cfg.stages:
        stages.append(build_stage(cfg, ctx, offset))
        offset += cfg.steps
    return stages


def samples_due(stage: Stage, step: int) -> bool:
    every = stage.ctx.cfg.train.samples.every
    return every is not None and step % every == 0 and stage.ctx.runtime.rank == 0


from megatron_vlm.trainer.stages import grpo, preference, rft, sft  # noqa: E402,F401  (registers the kinds)
