"""The RFT stage: rejection-sampling fine-tuning (Intern-S1's offline RL, best-of-N). Sample n
responses per prompt, keep the best verified ones (`rejection:`), imitate them; the kept examples
are appended to `train.out_dir/rejection_sft.jsonl` as SFT data."""
from __future__ import annotations

import json
import time

from megatron_vlm.rl.rejection import build_rejection_sft
from megatron_vlm.trainer.sft import labelled_sample
from megatron_vlm.trainer.stages import Stage, register_stage, samples_due
from megatron_vlm.trainer.stages.grpo import observe_mix, save_samples
from megatron_vlm.trainer.stages.sft import imitate

REJECTION_FILE = "rejection_sft.jsonl"


@register_stage("rft")
class RFTStage(Stage):
    def step(self, step: int) -> dict:
        ctx, cfg = self.ctx, self.ctx.cfg
        start = time.perf_counter()
        samples = ctx.sample(ctx.draw(), cfg.rollout.sampling(ctx.actor.stop_token_ids, step))
        rollout_seconds = time.perf_counter() - start
        scored, result = ctx.score(samples)
        examples, stats = build_rejection_sft(scored, result.raw, cfg.rejection,
                                              [f.sample_id for f in result.failures])
        metrics = {"reward": sum(result.raw) / max(1, len(result.raw)), "samples": len(samples),
                   "time_rollout": rollout_seconds, **{f"rejection_{k}": v for k, v in stats.items()}}
        metrics.update(observe_mix(ctx, [(ctx.data.by_id[s.request_id], raw)
                                         for s, raw in zip(samples, result.raw)]))
        if samples_due(self, step):
            save_samples(ctx, step + self.offset, samples, result)
        if not examples:
            return metrics  # no prompt solved: nothing to imitate this step
        by_sample = {f"{s.request_id}#{s.index}": s for s in samples}
        kept = [by_sample[e.sample_id] for e in examples]
        metrics.update(imitate(ctx, [labelled_sample(s.request_id, s.prompt_ids, s.response_ids) for s in kept]))
        if ctx.runtime.rank == 0:
            with open(ctx.out_dir / REJECTION_FILE, "a") as f:
                for e in examples:
                    f.write(json.dumps({"id": e.sample_id, "task": e.task, "question": e.prompt,
                                        "response": e.response, "reward": e.reward,
                                        "pass_rate": e.pass_rate}) + "\n")
        return metrics
