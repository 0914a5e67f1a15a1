"""Supervised fine-tuning on labelled (prompt, answer) pairs with the RL stage's machinery.

Labelled examples become `RolloutSample`s whose response is the reference answer, so SFT shares
the batch building, the images, the packed micro-batches (plan_packs over DP ranks) and the
hidden-state log-probs (`kernels.logprobs.linear_logprobs`, no [T, V] logits) with the policy
update: the loss is the token-mean negative log-likelihood of the answer tokens, summed per
micro-batch and normalised once by the global token count (exact across micro-batches and DP).
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_vlm.rollout.protocol import RolloutSample
from megatron_vlm.trainer.actor_batch import SequenceBatch, forward_hidden, head_parallelism, packed_logprobs
from megatron_vlm.trainer.rl_step import make_microbatches, pack_budget, train_step


def labelled_sample(request_id: str, prompt_ids: list[int], answer_ids: list[int]) -> RolloutSample:
    return RolloutSample(request_id=request_id, index=0, prompt_ids=prompt_ids,
                         response_ids=answer_ids, logprobs=[0.0] * len(answer_ids),
                         finish_reason="stop", seconds=0.0)


def _nll_loss(packed, head: dict, output):
    """Summed NLL of this CP rank's tokens (all of them without CP) and their count: megatron sums
    both over DP x CP, so the step's loss is the token mean of the whole batch."""
    mask = packed.local(packed.loss_mask)
    logprobs, _ = packed_logprobs(output, packed.local(packed.labels), 1.0, head)
    loss = -(logprobs * mask).sum()
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}


def _sft_forward_step(data_iterator, model):
    packed = next(data_iterator)["batch"]
    return forward_hidden(model, packed), partial(_nll_loss, packed, head_parallelism(model))


def sft_step(model_chunks, optimizer, scheduler, batch: SequenceBatch, images_per_row, patches,
             micro_batch_size: int, pack_tokens: int | None = None) -> dict[str, float]:
    """One optimizer step on a labelled batch, packed and dealt to the DP ranks (pack_tokens:
    tokens per micro-batch; None = micro_batch_size x the batch's padded width)."""
    rows = list(range(batch.input_ids.shape[0]))
    mbs = make_microbatches(batch, images_per_row, patches, rows, pack_budget(pack_tokens, micro_batch_size, batch),
                            None, None, None, model_chunks[0].config)
    return train_step(model_chunks, optimizer, scheduler, mbs, _sft_forward_step)
