"""One offline preference step (DPO / MPO) on the megatron VLM: pairs -> packed micro-batches ->
megatron's schedule -> optimizer step.

    pairs = pair_batch([(request, chosen_ids, rejected_ids), ...], prepare, pad_id, spatial_merge_size)
    ref_logprobs = reference.score(pairs.batch, pairs.images_per_row, pairs.patches, 1.0, mbs)  # [B, S]
    metrics = preference_step([ddp], optimizer, scheduler, pairs.batch, pairs.images_per_row,
                              pairs.patches, ref_logprobs, PreferenceConfig(name="dpo"), mbs)

Batch rows alternate chosen_0, rejected_0, chosen_1, ... A pair is never split: `plan_packs` deals
whole pairs to the DP ranks and packs them into THD micro-batches (actor_batch.pack_rows) under the
trainer's token budget (`micro_batch_size` rows x the padded width, or `pack_tokens`), the same
number on every rank. Log-probs come from the last stage's hidden states through the fused head
(actor_batch.packed_logprobs), as for the policy update and SFT.

Exact normalisation (the policy is built with megatron's calculate_per_token_loss=True): each
micro-batch returns the registered loss called with num_pairs=1, i.e. the *sum* over its pairs, and
its pair count; megatron sums gradients over micro-batches and DP ranks and divides once by the
global pair count. MPO's SFT term is a mean over chosen *tokens*, a different unit: it enters each
micro-batch scaled by (global pairs / global chosen tokens), so that the one division by the pair
count leaves it divided by the chosen-token count. Both counts come from the full batch, which every
rank holds. A micro-batch left without pairs (fewer pairs than micro-batches on a rank) packs pair 0
with its loss zeroed and 0 units, so that every rank joins the reductions.

Sequence log-probs are sums over the whole response, a non-linear input to the loss. Under context
parallelism each rank holds part of every response, so the sums are all-reduced over the CP group
(differentiably) and every CP rank computes the whole micro-batch's loss and counts its pairs:
megatron's sums over DP x CP then carry CP times the gradient and CP times the pairs, and the one
division by the pair count gives the exact gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch

from kernels.packing import PackCost, plan_packs
from megatron_vlm.rl.preference import PreferenceConfig, PreferenceInputs, RewardShift, preference_loss_fn
from megatron_vlm.rollout.embedded import Prepared
from megatron_vlm.rollout.protocol import RolloutRequest
from megatron_vlm.trainer.actor_batch import (SequenceBatch, build_batch, cp_coordinates, fixed_pack_length,
                                              forward_hidden, head_parallelism, loss_cp_group, pack_padding,
                                              pack_rows, packed_logprobs)
from megatron_vlm.trainer.rl_step import pack_budget, train_step
from megatron_vlm.trainer.sft import labelled_sample

SUMMED_METRICS = ("dpo_loss", "bco_loss", "sft_loss")  # already sums over the micro-batch's pairs


@dataclass
class PairBatch:
    batch: SequenceBatch          # 2P rows: chosen_0, rejected_0, chosen_1, ...
    images_per_row: list[int]
    patches: list[int]            # patches per image, for micro-batch slicing

    @property
    def num_pairs(self) -> int:
        return self.batch.input_ids.shape[0] // 2


def pair_batch(pairs: Sequence[tuple[RolloutRequest, list[int], list[int]]],
               prepare: Callable[[RolloutRequest], Prepared], pad_id: int,
               spatial_merge_size: int) -> PairBatch:
    """The batch of (request, chosen response ids, rejected response ids) pairs. `prepare` gives a
    request's processor output (the stage runner's PromptCache); the response ids are taken as they
    are (the loader's end with <|im_end|>)."""
    samples, prepared = [], {}
    for request, chosen, rejected in pairs:
        if not chosen or not rejected:
            raise ValueError(f"pair {request.request_id}: chosen and rejected responses must be non-empty")
        prep = prepared[request.request_id] = prepare(request)
        prompt = prep.input_ids.tolist()  # expanded: one token per merged image patch
        samples += [labelled_sample(request.request_id, prompt, list(chosen)),
                    labelled_sample(request.request_id, prompt, list(rejected))]
    batch, images_per_row, patches = build_batch(samples, prepared, pad_id, spatial_merge_size)
    return PairBatch(batch, images_per_row, patches)


def pair_microbatches(batch: SequenceBatch, images_per_row: list[int], patches: list[int],
                      ref_logprobs: torch.Tensor, token_budget: int, config) -> list[dict]:
    """This DP rank's packed micro-batches of whole pairs: `plan_packs` deals pairs (a pair's cost
    is its two rows) to the DP ranks, balanced, with the same number of micro-batches on every rank
    (the pipeline schedule and the expert-parallel all-to-alls need it). A micro-batch left
    without a pair packs pair 0 with its loss zeroed, so that every rank joins the reductions."""
    from megatron.core import parallel_state as ps

    lengths = batch.row_lengths()
    pair_lengths = [lengths[2 * p] + lengths[2 * p + 1] for p in range(len(lengths) // 2)]
    pair_images = [int(batch.mm_token_type_ids[2 * p: 2 * p + 2].sum()) for p in range(len(pair_lengths))]
    plan = plan_packs(pair_lengths, max(token_budget, max(pair_lengths)), ps.get_data_parallel_world_size(),
                      pair_images, PackCost())
    multiple, cp = pack_padding(config), cp_coordinates(config)
    length = fixed_pack_length(config, ([lengths[r] for p in pack for r in (2 * p, 2 * p + 1)]
                                        for rank in plan.microbatches for pack in rank))
    out = []
    for pairs in plan.microbatches[ps.get_data_parallel_rank()]:
        rows = [row for p in (pairs or [0]) for row in (2 * p, 2 * p + 1)]  # chosen, rejected, ...
        packed = pack_rows(batch, rows, images_per_row, patches, multiple, length, cp)
        out.append({"batch": packed, "ref_logprobs": packed.local(packed.take(ref_logprobs)), "silent": not pairs})
    return out


@dataclass(frozen=True)
class _Norm:
    chosen_tokens_per_pair: float  # global chosen tokens / global pairs (MPO's SFT term)
    reward_shift: float


def _pair_loss(mb: dict, cfg: PreferenceConfig, norm: _Norm, head: dict, output):
    packed = mb["batch"]
    logprobs, _ = packed_logprobs(output, packed.local(packed.labels), 1.0, head)  # [T(/cp)]
    inputs = PreferenceInputs.from_packed(  # mb is on the model's device (megatron_step.on_device)
        logprobs, mb["ref_logprobs"], packed.local(packed.loss_mask), packed.local_cu_seqlens,
        cp_group=loss_cp_group(packed), num_pairs=1.0,
        num_chosen_tokens=norm.chosen_tokens_per_pair, reward_shift=norm.reward_shift)
    loss, metrics = preference_loss_fn(inputs, cfg)  # the sum over this micro-batch's pairs
    scale = 0.0 if mb["silent"] else 1.0
    pairs = torch.tensor(0.0 if mb["silent"] else float(len(inputs.chosen_logps)), device=logprobs.device)
    chosen, rejected = _log_ratio_sums(inputs)
    report = {"lm loss": torch.stack([loss.detach() * scale, pairs]),
              "logratio_chosen": torch.stack([chosen * scale, pairs]),
              "logratio_rejected": torch.stack([rejected * scale, pairs])}
    for name, value in metrics.items():
        if name == "bco_reward_sum":
            count = metrics["bco_reward_count"].to(value.device)
            report["bco_reward"] = torch.stack([value * scale, count * scale])
        elif name != "bco_reward_count":
            total = value if name in SUMMED_METRICS else value * pairs  # means over the pairs -> sums
            report[name] = torch.stack([total.float() * scale, pairs])
    return loss * scale, pairs.to(torch.int), report


def _log_ratio_sums(inputs: PreferenceInputs) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = (inputs.chosen_logps - inputs.ref_chosen_logps).detach().sum()
    rejected = (inputs.rejected_logps - inputs.ref_rejected_logps).detach().sum()
    return chosen, rejected


def _pair_forward_step(cfg: PreferenceConfig, norm: _Norm, data_iterator, model):
    mb = next(data_iterator)
    return forward_hidden(model, mb["batch"]), partial(_pair_loss, mb, cfg, norm, head_parallelism(model))


def preference_step(model_chunks, optimizer, scheduler, batch: SequenceBatch, images_per_row: list[int],
                    patches: list[int], ref_logprobs: torch.Tensor, cfg: PreferenceConfig,
                    micro_batch_size: int, reward_shift: float | RewardShift = 0.0,
                    pack_tokens: int | None = None) -> dict[str, float]:
    """One optimizer step of `cfg.name` (dpo | mpo) on the pairs of `batch`. Every rank holds the
    full batch and the reference log-probs [B, S]; pairs are packed and dealt to the DP ranks
    (pack_tokens: tokens per micro-batch; None = micro_batch_size rows x the padded width).

    Metrics (means over all pairs of all DP ranks): loss, reward_accuracy (share of pairs whose
    implicit reward beta * log-ratio is higher for the chosen response), reward_margin,
    reward_chosen / reward_rejected, logratio_chosen / logratio_rejected (logp - ref summed over
    the response), the loss's own terms, grad_norm, lr. MPO adds bco_reward_sum / bco_reward_count
    (global) for `RewardShift.update`; `reward_shift` is the delta (or RewardShift) to use now."""
    rows = batch.input_ids.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"preference_step needs a non-empty batch of chosen / rejected row pairs, got {rows} rows")
    if tuple(ref_logprobs.shape) != tuple(batch.input_ids.shape):
        raise ValueError(f"ref_logprobs must be [B, S] = {list(batch.input_ids.shape)}, got {list(ref_logprobs.shape)}")
    num_pairs = rows // 2
    shift = reward_shift.mean if isinstance(reward_shift, RewardShift) else float(reward_shift)
    chosen_tokens = float(batch.loss_mask[0::2].sum())
    norm = _Norm(chosen_tokens_per_pair=max(chosen_tokens, 1.0) / num_pairs, reward_shift=shift)
    microbatches = pair_microbatches(batch, images_per_row, patches, ref_logprobs,
                                     pack_budget(pack_tokens, micro_batch_size, batch), model_chunks[0].config)
    metrics = train_step(model_chunks, optimizer, scheduler, microbatches, partial(_pair_forward_step, cfg, norm))
    if "bco_reward" in metrics:  # the global sum and count, for RewardShift.update
        metrics["bco_reward_count"] = 2.0 * num_pairs
        metrics["bco_reward_sum"] = metrics.pop("bco_reward") * 2.0 * num_pairs
    return metrics
