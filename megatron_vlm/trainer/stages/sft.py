"""The SFT stage: `batch_size` labelled examples per step (`vlm.sft_data`: prompt + response),
drawn by the run's seeded sampler; the loss is the token-mean NLL of the response."""
from __future__ import annotations

from megatron_vlm.trainer.actor_batch import build_batch
from megatron_vlm.trainer.sft import labelled_sample, sft_step
from megatron_vlm.trainer.stages import Stage, register_stage


@register_stage("sft")
class SFTStage(Stage):
    def step(self, step: int) -> dict:
        ctx = self.ctx
        chosen = ctx.data.rng.sample(ctx.data.sft, min(self.cfg.batch_size, len(ctx.data.sft)))
        eos = ctx.tokenizer.eos_token_id
        samples = []
        for request in chosen:
            target = ctx.tokenizer(request.metadata["response"], add_special_tokens=False).input_ids
            if not target or target[-1] != eos:  # end once, not twice
                target = target + [eos]
            samples.append(labelled_sample(request.request_id, ctx.cache(request).input_ids.tolist(), target))
        return imitate(ctx, samples)


def imitate(ctx, samples) -> dict:
    """One SFT optimizer step on labelled samples (prompt ids expanded, response = target)."""
    actor = ctx.actor
    batch, images, patches = build_batch(samples, {s.request_id: ctx.cache.get(s.request_id) for s in samples},
                                         actor.pad_id, actor.spatial_merge_size)
    metrics = sft_step([actor.ddp], actor.optimizer, actor.scheduler, batch, images, patches,
                       ctx.cfg.update.micro_batch_size)
    metrics["train_tokens"] = int(batch.loss_mask.sum())  # the response tokens imitated
    return metrics
