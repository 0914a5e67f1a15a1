"""Supervised fine-tuning on labelled (prompt, answer) pairs with the RL stage's machinery.

Labelled examples become `RolloutSample`s whose response is the reference answer, so SFT shares
the batch building, the images, the micro-batching and the vocab-parallel log-prob code with the
policy update: the loss is the token-mean negative log-likelihood of the answer tokens, summed per
micro-batch and normalised once by the global token count (exact across micro-batches and DP).
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_vlm.parallel.batching import split_for_cp
from megatron_vlm.rollout.protocol import RolloutSample
from megatron_vlm.trainer.actor_batch import SequenceBatch, token_logprobs
from megatron_vlm.trainer.rl_step import dp_rows, make_microbatches, reduce_metrics


def labelled_sample(request_id: str, prompt_ids: list[int], answer_ids: list[int]) -> RolloutSample:
    return RolloutSample(request_id=request_id, index=0, prompt_ids=prompt_ids,
                         response_ids=answer_ids, logprobs=[0.0] * len(answer_ids),
                         finish_reason="stop", seconds=0.0)


def _nll_loss(labels, loss_mask, logits):
    from megatron.core import parallel_state as ps

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    mask = split_for_cp(loss_mask, cp, cp_rank)
    logprobs = token_logprobs(logits, split_for_cp(labels, cp, cp_rank), 1.0)
    loss = -(logprobs * mask).sum()
    tokens = mask.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens])}


def _sft_forward_step(data_iterator, model):
    batch: SequenceBatch = next(data_iterator)["batch"]
    logits = model(batch.input_ids, batch.position_ids, pixel_values=batch.pixel_values,
                   image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids)
    return logits, partial(_nll_loss, batch.labels, batch.loss_mask)


def sft_step(model_chunks, optimizer, scheduler, batch: SequenceBatch, images_per_row, patches,
             micro_batch_size: int) -> dict[str, float]:
    """One optimizer step on this DP rank's rows of a labelled batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows = dp_rows(batch.input_ids.shape[0])
    mbs = make_microbatches(batch, images_per_row, patches, rows, micro_batch_size, None, None, None)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=_sft_forward_step, data_iterator=iter(mbs), model=model_chunks,
        num_microbatches=len(mbs), seq_length=batch.input_ids.shape[1],
        micro_batch_size=micro_batch_size, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise FloatingPointError("optimizer step skipped: non-finite gradients")
    scheduler.step(increment=1)
    metrics = reduce_metrics(out)
    metrics.update(grad_norm=float(grad_norm or 0.0), lr=optimizer.param_groups[0]["lr"])
    return metrics
