"""One rank of the DP-split scoring launch: score_rows with each DP rank scoring its share of the
rows and the shares all-gathered, against every rank scoring every row, for a token budget of one
row per pack and for micro_batch_size=4; on 2 gloo ranks at DP=2 and EP=2 x DP=2 (the experts'
all-to-alls span the DP ranks), on 4 at PP=2 x DP=2 (gather on the last stage, then the PP
broadcast) and TP=2 x DP=2. Writes the figures as JSON: max |split - unsplit|, max |this rank -
any rank|, and each DP rank's rows, tokens, packs and masked stand-in packs.
"""
import json
import sys

import torch

from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.trainer import rl_step
from megatron_vlm.trainer.actor_batch import build_batch
from megatron_vlm.trainer.sft import labelled_sample
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import tiny_policy_weights

LAYOUTS = {2: {"dp2": ParallelConfig(), "ep2_dp2": ParallelConfig(ep=2, etp=1)},  # by world size
           4: {"pp2_dp2": ParallelConfig(pp=2), "tp2_dp2": ParallelConfig(tp=2)}}
TEMPERATURE = 0.9


def uneven_batch():
    """9 rows, 3 per prompt (two with images), responses of 1..12 tokens: uneven row lengths."""
    requests, prepared = fixture_requests()
    gen = torch.Generator().manual_seed(3)
    samples = []
    for r in requests:
        for _ in range(3):
            n = int(torch.randint(1, 13, (1,), generator=gen))
            answer = torch.randint(1, 190, (n,), generator=gen).tolist()  # below the image ids
            samples.append(labelled_sample(r.request_id, prepared[r.request_id].input_ids.tolist(), answer))
    return build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)


def across_ranks_max_abs(value: torch.Tensor) -> float:
    """max |value on this rank - value on any rank| (gloo world)."""
    gathered = [torch.empty_like(value) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, value)
    return max(float((g - value).abs().max()) for g in gathered)


def all_ranks(count: int) -> list[int]:
    gathered = [torch.zeros(1, dtype=torch.long) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, torch.tensor([count]))
    return [int(g) for g in gathered]


def share_report(batch, budget: int, dp_size: int) -> list[dict]:
    lengths = batch.row_lengths()
    plan = rl_step._plan(batch, list(range(batch.input_ids.shape[0])), budget, dp_size)
    return [{"rows": sum(len(p) for p in rank), "tokens": sum(lengths[r] for p in rank for r in p),
             "packs": len(rank), "stand_in_packs": sum(not p for p in rank)} for rank in plan]


def main():
    out_path = sys.argv[1]
    runtime = init_runtime(ParallelConfig(), seed=5)
    hf, family, _, full = tiny_policy_weights(seed=2, aux_loss=False)
    batch, images, patches = uneven_batch()
    budgets = {"one_row_per_pack": dict(micro_batch_size=1, pack_tokens=int(batch.lengths.max())),
               "micro_batch_size_4": dict(micro_batch_size=4)}
    report = {"row_lengths": batch.row_lengths()}
    for name, parallel in LAYOUTS[runtime.world_size].items():
        set_layout(runtime, parallel, seed=5)
        model = family.build(hf.config, parallel, "cpu", calculate_per_token_loss=True)
        load_full_state_dict(model, full, RankLayout.current(model.config))
        for budget_name, budget in budgets.items():
            score = lambda split: rl_step.score_rows(model, batch, images, patches, TEMPERATURE,  # noqa: E731
                                                     split_over_dp=split, **budget)
            calls = []
            hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
            split = score(True)
            hook.remove()
            unsplit = score(False)
            tokens = rl_step.pack_budget(budget.get("pack_tokens"), budget["micro_batch_size"], batch)
            report[f"{name}/{budget_name}"] = {
                "max_abs_split_vs_unsplit": float((split - unsplit).abs().max()),
                "max_abs_across_ranks": across_ranks_max_abs(split),
                "split_forwards_per_rank": all_ranks(len(calls)),
                "shares": share_report(batch, tokens, parallel.data_parallel_size(runtime.world_size))}
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
