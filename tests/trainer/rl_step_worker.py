"""One rank of the RL-step launch (2 gloo ranks): a full RL step of a tiny Qwen3-VL-MoE, twice.

1. Sync the trainer's weights into the embedded engine, generate groups, check the engine's log-probs
   against the trainer's, score the samples, GRPO advantages, trainer-side old log-probs.
2. Update at TP=2 (DP=1, all rows in ONE packed micro-batch) and, from the same start, at EP=2
   (DP=2, a token budget of the longest row: every rank runs several packed micro-batches). Exact
   normalisation means the same parameters after the optimizer step.
3. The same pair of layouts with CISPO (the torch loss path), Dr. GRPO's seq-mean-token-sum-norm
   (sequences x one constant length over micro-batches and DP ranks) and token-level truncated IS
   against engine log-probs that differ from the trainer's.
4. On-policy old log-probs (the update forward's own, old_logprobs=None) at EP=2: the same step as
   part 2's, the log-probs handed to on_logprobs equal score_rows' on every rank, and a raising
   on_logprobs leaves every weight as it was. Writes the figures as JSON.
"""
import json
import sys

import torch

from megatron_vlm.checkpoint.streaming import iter_hf_weights
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.rl.losses import LossConfig
from megatron_vlm.rollout.embedded import EmbeddedEngine
from megatron_vlm.rollout.protocol import SamplingParams
from megatron_vlm.rollout.weight_sync import SyncCheckConfig, check_logprobs, sync_weights
from megatron_vlm.trainer.actor_batch import build_batch, response_logprobs
from megatron_vlm.config import OptimConfig
from megatron_vlm.rl.config import UpdateConfig
from megatron_vlm.rl.rollout_correction import RolloutCorrectionConfig
from megatron_vlm.trainer.rl_step import score_rows, sequence_advantages, update
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import build_policy, tiny_policy_weights

UPDATE = UpdateConfig(temperature=0.9, loss=LossConfig(name="dapo"))
OPTIM = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0)


def build(family, hf, full, parallel, runtime):
    set_layout(runtime, parallel, seed=5)
    return build_policy(family, hf, full, parallel, OPTIM)


def main():
    out_path = sys.argv[1]
    runtime = init_runtime(ParallelConfig(), seed=5)
    # no router load-balancing loss: this test is about the policy loss's normalisation
    hf, family, rules, full = tiny_policy_weights(seed=2, aux_loss=False)
    report = {}

    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(tp=2), runtime)
    requests, prepared = fixture_requests()
    engine = EmbeddedEngine(hf.config, prepare=lambda r: prepared[r.request_id])
    stats = sync_weights(model, rules, engine, bucket_bytes=100_000)
    sampling = SamplingParams(temperature=UPDATE.temperature, max_new_tokens=6, n=4, seed=9,
                              stop_token_ids=[7])
    samples = engine.generate(requests, sampling)
    batch, images, patches = build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)
    old = score_rows(model, batch, images, patches, UPDATE.temperature, micro_batch_size=4)
    check = check_logprobs([s.logprobs for s in samples], response_logprobs(old, batch),
                           SyncCheckConfig().resolved("float32"))
    rewards = torch.tensor([sum(t < 100 for t in s.response_ids) / max(1, len(s.response_ids))
                            for s in samples])
    advantages = sequence_advantages(rewards, [s.request_id for s in samples], batch.loss_mask,
                                     UPDATE.advantage)
    report.update(sync_seconds=stats.seconds, sync_tensors=stats.tensors, sync_buckets=stats.buckets,
                  sync_max_abs=check.max_abs, sync_mean_abs=check.mean_abs, samples=len(samples),
                  mixed_groups=int(sum(len(set(rewards[i * 4:(i + 1) * 4].tolist())) > 1 for i in range(3))))

    one = UpdateConfig(temperature=UPDATE.temperature, loss=UPDATE.loss, pack_tokens=int(batch.lengths.sum()))
    metrics_one = update([ddp], optimizer, scheduler, batch, images, patches, old, advantages, one)
    after_one = {k: v.clone() for k, v in iter_hf_weights(model, rules)}

    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(ep=2, etp=1), runtime)
    many = UpdateConfig(temperature=UPDATE.temperature, loss=UPDATE.loss, pack_tokens=int(batch.lengths.max()))
    metrics_many = update([ddp], optimizer, scheduler, batch, images, patches, old, advantages, many)
    after_many = dict(iter_hf_weights(model, rules))
    moved = max(float((after_one[k] - full_hf).abs().max()) for k, full_hf in
                hf.state_dict().items() if k in after_one and after_one[k].shape == full_hf.shape)
    report.update(
        loss_one=metrics_one["loss"], loss_many=metrics_many["loss"],
        clip_metrics=sorted(k for k in metrics_one if k not in ("loss", "grad_norm", "lr")),
        grad_norm_one=metrics_one["grad_norm"], grad_norm_many=metrics_many["grad_norm"],
        param_max_abs_diff=max(float((after_one[k] - after_many[k]).abs().max()) for k in after_one),
        param_max_update=moved, entropy_one=metrics_one["entropy"], entropy_many=metrics_many["entropy"])

    # 3. CISPO + Dr. GRPO aggregation + truncated IS, one pack on DP=1 against many on DP=2
    g = torch.Generator().manual_seed(3)
    engine_lp = (old + 0.5 * torch.randn(old.shape, generator=g)) * batch.loss_mask  # ratios both sides of C
    corrected = dict(temperature=UPDATE.temperature, rollout_correction=RolloutCorrectionConfig(clip=1.5),
                     loss=LossConfig(name="cispo", aggregation="seq-mean-token-sum-norm"))
    corrected_after = {}
    for name, parallel, tokens in (("one", ParallelConfig(tp=2), int(batch.lengths.sum())),
                                   ("many", ParallelConfig(ep=2, etp=1), int(batch.lengths.max()))):
        model, ddp, optimizer, scheduler = build(family, hf, full, parallel, runtime)
        m = update([ddp], optimizer, scheduler, batch, images, patches, old, advantages,
                   UpdateConfig(pack_tokens=tokens, **corrected), engine_logprobs=engine_lp, max_response_len=6)
        corrected_after[name] = dict(iter_hf_weights(model, rules))
        report.update({f"corrected_loss_{name}": m["loss"], f"corrected_grad_norm_{name}": m["grad_norm"],
                       f"corrected_truncated_{name}": m["rollout_truncated_share"]})
    report["corrected_param_max_abs_diff"] = max(
        float((corrected_after["one"][k] - corrected_after["many"][k]).abs().max()) for k in corrected_after["one"])
    report["corrected_param_max_update"] = max(
        float((corrected_after["one"][k] - full_hf).abs().max()) for k, full_hf in hf.state_dict().items()
        if k in corrected_after["one"] and corrected_after["one"][k].shape == full_hf.shape)

    # 4. on-policy: pi_old from the update's own forward (old_logprobs=None), at EP=2 x DP=2 (packs
    # dealt to two DP ranks, the log-probs gathered): the step part 2 took with scored old log-probs;
    # the log-probs handed to on_logprobs before the optimizer step are score_rows'
    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(ep=2, etp=1), runtime)
    seen = []
    metrics_on = update([ddp], optimizer, scheduler, batch, images, patches, None, advantages, many,
                        on_logprobs=seen.append)
    after_on = dict(iter_hf_weights(model, rules))
    gathered = [torch.empty_like(seen[0]) for _ in range(runtime.world_size)]
    torch.distributed.all_gather(gathered, seen[0])
    report.update(
        on_policy_calls=len(seen), on_policy_logprobs_max_abs=float((seen[0] - old).abs().max()),
        on_policy_logprobs_across_ranks=max(float((g - seen[0]).abs().max()) for g in gathered),
        on_policy_off_response=float((seen[0] * (batch.lengths[:, None] <= torch.arange(old.shape[1]))).abs().max()),
        on_policy_param_max_abs_diff=max(float((after_on[k] - after_many[k]).abs().max()) for k in after_on),
        on_policy_loss=metrics_on["loss"], on_policy_approx_kl=metrics_on["approx_kl"],
        on_policy_ratio=[metrics_on["ratio_min"], metrics_on["ratio_max"]], scored_approx_kl=metrics_many["approx_kl"])
    # a check that raises in on_logprobs stops the step before the optimizer moves a weight (TP=2)
    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(tp=2), runtime)

    def refuse(_):
        raise RuntimeError("planted sync failure")

    try:
        update([ddp], optimizer, scheduler, batch, images, patches, None, advantages, one, on_logprobs=refuse)
        report["refused_raised"] = False
    except RuntimeError as error:
        report["refused_raised"] = str(error) == "planted sync failure"
    report["refused_param_max_update"] = max(
        float((w - hf.state_dict()[k]).abs().max()) for k, w in iter_hf_weights(model, rules)
        if k in hf.state_dict() and w.shape == hf.state_dict()[k].shape)
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
