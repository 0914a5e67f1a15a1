"""One rank of the preference-step launch (2 gloo ranks), a tiny Qwen3-VL-MoE:

1. Exactness, for dpo and mpo: from the same weights, one step at TP=2 (DP=1, all pairs in ONE
   packed micro-batch), at EP=2 (DP=2, 5 pairs dealt by plan_packs and packed under a two-row
   budget: several micro-batches per rank) and at CP=2 (every response cut over the two ranks)
   gives the same loss, grad norm and parameters.
   Responses of different lengths and a reference that differs from the policy per pair make
   every pair weigh differently. The same with a single pair: one DP rank runs a zeroed stand-in.
2. A few DPO steps (EP=2) against the frozen initial model raise the implicit-reward margin and the
   reward accuracy on the training pairs, measured by scoring before and after.
Writes the figures as JSON.
"""
import json
import sys
import time

import torch

from megatron_vlm.checkpoint.streaming import iter_hf_weights
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.rl.preference import PreferenceConfig, RewardShift
from megatron_vlm.config import OptimConfig
from megatron_vlm.trainer.preference import pair_batch, pair_microbatches, preference_step
from megatron_vlm.trainer.rl_step import score_rows
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import build_policy, tiny_policy_weights

OPTIM = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=1.0)
NUM_PAIRS, DPO_STEPS = 5, 6


def build(family, hf, full, parallel, runtime, optim=OPTIM, steps=1):
    set_layout(runtime, parallel, seed=5)
    return build_policy(family, hf, full, parallel, optim, total_steps=steps)


def make_pairs(num_pairs=NUM_PAIRS):
    """num_pairs pairs over the fixture's 3 prompts; random responses of 3..9 tokens, ending in 7."""
    requests, prepared = fixture_requests()
    g = torch.Generator().manual_seed(11)
    response = lambda: torch.randint(10, 180, (int(torch.randint(2, 9, (1,), generator=g)),),  # noqa: E731
                                     generator=g).tolist() + [7]
    pairs = [(requests[i % 3], response(), response()) for i in range(num_pairs)]
    return pair_batch(pairs, lambda r: prepared[r.request_id], pad_id=0, spatial_merge_size=2)


def implicit_margins(model, pairs, ref, beta):
    """beta * ((logp_c - ref_c) - (logp_r - ref_r)) per pair [P], scored with no grad."""
    logp = score_rows(model, pairs.batch, pairs.images_per_row, pairs.patches, 1.0, micro_batch_size=4)
    ratio = ((logp - ref) * pairs.batch.loss_mask).sum(-1)  # [2P]
    return beta * (ratio[0::2] - ratio[1::2])


def exactness(family, hf, full, rules, runtime, pairs, ref, name):
    """One step in each layout from the same weights; the differences."""
    cfg = PreferenceConfig(name=name)
    shift = RewardShift(mean=0.05, count=10.0)
    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(tp=2), runtime)
    one = preference_step([ddp], optimizer, scheduler, pairs.batch, pairs.images_per_row, pairs.patches,
                          ref, cfg, micro_batch_size=2 * pairs.num_pairs, reward_shift=shift)
    after_one = {k: v.clone() for k, v in iter_hf_weights(model, rules)}
    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(ep=2, etp=1), runtime)
    budget = 2 * pairs.batch.input_ids.shape[1]
    microbatches = len(pair_microbatches(pairs.batch, pairs.images_per_row, pairs.patches, ref, budget, model.config))
    many = preference_step([ddp], optimizer, scheduler, pairs.batch, pairs.images_per_row, pairs.patches,
                           ref, cfg, micro_batch_size=2, reward_shift=shift)
    after_many = dict(iter_hf_weights(model, rules))
    # CP=2: each rank holds chunks of every response; the sequence sums go over the CP group
    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(cp=2), runtime)
    cp = preference_step([ddp], optimizer, scheduler, pairs.batch, pairs.images_per_row, pairs.patches,
                         ref, cfg, micro_batch_size=2, reward_shift=shift)
    after_cp = dict(iter_hf_weights(model, rules))
    start = hf.state_dict()
    return {"microbatches_many": microbatches, "loss_one": one["loss"], "loss_many": many["loss"],
            "grad_norm_one": one["grad_norm"],
            "grad_norm_many": many["grad_norm"],
            "metric_max_abs_diff": max(abs(one[k] - many[k]) for k in one if k not in ("lr",)),
            "metrics": sorted(one),
            "param_max_abs_diff": max(float((after_one[k] - after_many[k]).abs().max()) for k in after_one),
            "param_max_update": max(float((after_one[k] - start[k]).abs().max()) for k in after_one
                                    if k in start and start[k].shape == after_one[k].shape),
            "loss_cp": cp["loss"], "grad_norm_cp": cp["grad_norm"],
            "metric_max_abs_diff_cp": max(abs(one[k] - cp[k]) for k in one if k not in ("lr",)),
            "param_max_abs_diff_cp": max(float((after_one[k] - after_cp[k]).abs().max()) for k in after_one),
            "bco_reward_count": one.get("bco_reward_count"), "bco_reward_sum_one": one.get("bco_reward_sum"),
            "bco_reward_sum_many": many.get("bco_reward_sum")}


def dpo_training(family, hf, full, runtime, pairs):
    cfg = PreferenceConfig(name="dpo", beta=0.1)
    optim = OptimConfig(lr=3e-3, adam_eps=1e-6, clip_grad=1.0)
    model, ddp, optimizer, scheduler = build(family, hf, full, ParallelConfig(ep=2, etp=1), runtime,
                                             optim, DPO_STEPS)
    ref = score_rows(model, pairs.batch, pairs.images_per_row, pairs.patches, 1.0, micro_batch_size=4)
    before = implicit_margins(model, pairs, ref, cfg.beta)
    steps = [preference_step([ddp], optimizer, scheduler, pairs.batch, pairs.images_per_row,
                             pairs.patches, ref, cfg, micro_batch_size=4) for _ in range(DPO_STEPS)]
    after = implicit_margins(model, pairs, ref, cfg.beta)
    return {"margin_before": float(before.mean()), "margin_after": float(after.mean()),
            "accuracy_before": float((before > 0).float().mean()),
            "accuracy_after": float((after > 0).float().mean()),
            "loss_per_step": [s["loss"] for s in steps], "margin_per_step": [s["reward_margin"] for s in steps],
            "accuracy_per_step": [s["reward_accuracy"] for s in steps]}


def main():
    out_path = sys.argv[1]
    start = time.perf_counter()
    runtime = init_runtime(ParallelConfig(), seed=5)
    # no router load-balancing loss: this test is about the preference loss's normalisation
    hf, family, rules, full = tiny_policy_weights(seed=2, aux_loss=False)
    pairs = make_pairs()

    model, *_ = build(family, hf, full, ParallelConfig(tp=2), runtime)
    ref = score_rows(model, pairs.batch, pairs.images_per_row, pairs.patches, 1.0, micro_batch_size=4)
    g = torch.Generator().manual_seed(3)  # a reference away from the policy, by a different amount per pair
    ref = ref - 0.5 * torch.rand(ref.shape, generator=g) * pairs.batch.loss_mask
    report = {"rows": pairs.batch.input_ids.shape[0],
              "response_lengths": pairs.batch.loss_mask.sum(-1).int().tolist()}
    for name in ("dpo", "mpo"):
        report[name] = exactness(family, hf, full, rules, runtime, pairs, ref, name)
    # one pair over two DP ranks: the rank without a pair runs a zeroed one
    single = make_pairs(1)
    report["single_pair"] = exactness(family, hf, full, rules, runtime, single,
                                      ref[:2, :single.batch.input_ids.shape[1]], "dpo")
    report["training"] = dpo_training(family, hf, full, runtime, pairs)
    report["seconds"] = time.perf_counter() - start
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
