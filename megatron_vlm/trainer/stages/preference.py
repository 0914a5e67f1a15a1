"""The DPO and MPO stages: offline preference training on `batch_size` pairs per step
(`vlm.preference_data`: the prompt's columns, chosen, rejected), against the reference policy (the
policy that entered the stage). MPO's BCO term keeps a running shift of the implicit rewards: the
stage's state."""
from __future__ import annotations

from dataclasses import replace

from megatron_vlm.data.loading import load_preferences, select_kinds
from megatron_vlm.rl.preference import RewardShift
from megatron_vlm.trainer.preference import pair_batch, preference_step
from megatron_vlm.trainer.stages import Stage, register_stage


class PreferenceStage(Stage):
    def __init__(self, ctx, cfg, offset: int = 0):
        super().__init__(ctx, cfg, offset)
        self.reward_shift = RewardShift()

    def step(self, step: int) -> dict:
        ctx, actor = self.ctx, self.ctx.actor
        pairs = self.pairs()
        chosen = ctx.data.rng.sample(pairs, min(self.cfg.batch_size, len(pairs)))
        batch = pair_batch(chosen, ctx.cache, actor.pad_id, actor.spatial_merge_size)
        mbs = ctx.cfg.update.micro_batch_size
        ref = actor.reference.score(batch.batch, batch.images_per_row, batch.patches, 1.0, mbs)
        metrics = preference_step([actor.ddp], actor.optimizer, actor.scheduler, batch.batch,
                                  batch.images_per_row, batch.patches, ref,
                                  replace(ctx.cfg.preference, name=self.cfg.kind), mbs,
                                  reward_shift=self.reward_shift)
        metrics["train_tokens"] = int(batch.batch.loss_mask.sum())  # chosen + rejected response tokens
        if "bco_reward_sum" in metrics:  # MPO's BCO shift: the running mean of implicit rewards
            self.reward_shift = self.reward_shift.update(metrics["bco_reward_sum"], metrics["bco_reward_count"])
        return metrics

    def pairs(self):
        data = self.ctx.data
        if data.pairs is None:
            path = self.ctx.assets / self.ctx.cfg.vlm.preference_data
            if not path.exists():
                raise FileNotFoundError(f"a {self.cfg.kind} stage needs preference pairs: {path} "
                                        f"(columns: the prompt's, chosen, rejected)")
            load = replace(self.ctx.cfg.vlm.load, max_prompt_length=self.ctx.cfg.vlm.max_prompt_length)
            kinds = self.ctx.cfg.vlm.kinds  # a chosen response is a demonstration: vlm.kinds.sft cuts them too
            data.pairs = select_kinds(load_preferences(path, self.ctx.processor, load), kinds.sft, kinds.column,
                                      source=path, field="vlm.kinds.sft").requests
        return data.pairs

    def state_dict(self) -> dict:
        return {"reward_shift": [self.reward_shift.mean, self.reward_shift.count]}

    def load_state_dict(self, state: dict) -> None:
        self.reward_shift = RewardShift(*state["reward_shift"])


register_stage("dpo")(PreferenceStage)
register_stage("mpo")(PreferenceStage)
