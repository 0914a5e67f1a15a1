"""One rank of the GRPO-stage launch (2 gloo ranks, TP=2): `grpo_step` with the recipe options.

TP=2 puts both ranks in one DP rank, so both embedded engines form one replica: the gathered batch
must hold each sample once. Steps, all from the same tiny Qwen3-VL-MoE:
1. k3 KL against a ReferencePolicy reset from the policy: the reference scores exactly the old
   log-probs, so the first step's KL loss is 0; a second step (policy moved) gives KL > 0.
2. Dynamic sampling with a reward that ties every group of one prompt: more draws until the batch
   holds `batch_groups` informative groups.
3. Soft over-long penalty and masking of truncated responses with a tiny generation limit.
Writes the figures as JSON for test_grpo_stage.py.
"""
import json
import sys
from dataclasses import replace

import torch

from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime
from megatron_vlm.rl.losses import LossConfig
from megatron_vlm.rl.overlong import OverlongPenaltyConfig
from megatron_vlm.rl.sampling import DynamicSamplingConfig
from megatron_vlm.rollout.embedded import EmbeddedEngine
from megatron_vlm.rl.config import RLConfig, RolloutConfig
from megatron_vlm.trainer.grpo import Actor, Rewards, grpo_step
from megatron_vlm.config import OptimConfig
from megatron_vlm.trainer.reference import ReferencePolicy
from megatron_vlm.rl.config import UpdateConfig
from megatron_vlm.rl.rollout_correction import RolloutCorrectionConfig
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import build_policy, tiny_policy_weights


class EmptyFirst:
    """The embedded engine, except that sample 0 of every group comes back empty (a crafted bad
    engine output; everything else is the real engine's)."""

    def __init__(self, engine):
        self.engine, self.emptied = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests, sampling):
        out = self.engine.generate(requests, sampling)
        for sample in out:
            if sample.index == 0:
                sample.response_ids, sample.logprobs, sample.finish_reason = [], [], "stop"
                self.emptied += 1
        return out


def rewards(values):
    return Rewards(torch.tensor(values), torch.tensor(values), {})


def main():
    out_path = sys.argv[1]
    parallel = ParallelConfig(tp=2)
    runtime = init_runtime(parallel, seed=5)
    hf, family, rules, full = tiny_policy_weights(seed=2)
    model, ddp, optimizer, scheduler = build_policy(family, hf, full, parallel,
                                                    OptimConfig(lr=1e-2, adam_eps=1e-3), total_steps=10)
    reference = ReferencePolicy.build(family, hf.config, parallel, "cpu")
    reference.reset_from(model)
    requests, prepared = fixture_requests()
    actor = Actor(model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler, rules=rules,
                  prepared=prepared.__getitem__, pad_id=0, spatial_merge_size=2, stop_token_ids=[7],
                  reference=reference)
    engine = EmbeddedEngine(hf.config, prepare=lambda r: prepared[r.request_id])
    rollout = RolloutConfig(prompts_per_step=3, n=4, max_new_tokens=6, temperature=0.9,
                            bucket_mb=0.1)
    update = UpdateConfig(temperature=0.9, micro_batch_size=4,
                          loss=LossConfig(name="dapo", kl_type="k3", kl_coef=0.1))

    def draw():
        return list(requests)

    def varied(samples):  # differs inside every group with overwhelming probability
        return rewards([len(s.response_ids) + sum(s.response_ids) % 7 / 10 for s in samples])

    report = {}
    first = grpo_step(actor, engine, draw, varied, rollout, update, step=1)
    second = grpo_step(actor, engine, draw, varied, rollout, update, step=2)
    report.update(samples=first["samples"], kl_first=first["kl_loss"], kl_second=second["kl_loss"],
                  sync_max_abs=first["sync_logprob_max_abs"], loss=first["loss"],
                  time_ref=first.get("time_ref_logprobs", 0.0))

    # r2 (the text-only prompt) always ties; the others vary. 2 informative groups per draw.
    def tie_r2(samples):
        return rewards([0.0 if s.request_id == "r2" else float(s.index % 2) for s in samples])

    update_plain = replace(update, loss=LossConfig(name="dapo"))
    dynamic = RLConfig(dynamic_sampling=DynamicSamplingConfig(batch_groups=3, max_draws=4))
    dyn = grpo_step(actor, engine, draw, tie_r2, rollout, update_plain, step=3, rl=dynamic)
    report.update(dyn_draws=dyn["dynamic_draws"], dyn_kept=dyn["dynamic_groups_kept"],
                  dyn_dropped=dyn["dynamic_groups_dropped"], dyn_samples=dyn["samples"],
                  dyn_train_tokens=dyn["train_tokens"])

    short = replace(rollout, max_new_tokens=3, drop_equal_groups=False)
    overlong = RLConfig(overlong=OverlongPenaltyConfig(max_response_len=3, buffer_len=2,
                                                       penalty_factor=1.0), mask_truncated=True)
    zeros = lambda samples: rewards([0.0] * len(samples))  # noqa: E731
    ol = grpo_step(actor, engine, draw, zeros, short, update_plain, step=4, rl=overlong)
    report.update(ol_reward=ol["reward_shaped"], ol_raw=ol["reward"], ol_truncated_share=ol["truncated_share"],
                  ol_masked=ol.get("masked_truncated", -1), ol_samples=ol["samples"],
                  ol_train_tokens=ol.get("train_tokens", 0), ol_response_length=ol["response_length"])
    # 4. an engine that returns empty responses for the first sample of every group: zero reward,
    #    kept in the batch, no tokens in the loss
    empty = EmptyFirst(engine)
    em = grpo_step(actor, empty, draw, varied, replace(rollout, drop_equal_groups=False),
                   update_plain, step=5)
    report.update(empty_samples=em["samples"], empty_seen=empty.emptied, empty_reward=em["reward"],
                  empty_train_tokens=em.get("train_tokens", 0), empty_response_length=em["response_length"],
                  empty_sync=em.get("sync_logprob_max_abs", 1.0))
    # 5. rollout correction from the stage: the engine's log-probs of its samples against the
    #    trainer's (equal here after the sync: ratio 1, nothing masked); refused with engine old log-probs
    corrected = replace(update_plain, rollout_correction=RolloutCorrectionConfig(name="icepop"))
    rc = grpo_step(actor, engine, draw, varied, rollout, corrected, step=6)
    report.update({k: v for k, v in rc.items() if k.startswith("rollout_")})
    try:
        grpo_step(actor, engine, draw, varied, replace(rollout, old_logprobs="engine"), corrected, step=7)
        report["rc_engine_refused"] = ""
    except ValueError as error:
        report["rc_engine_refused"] = str(error)
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
