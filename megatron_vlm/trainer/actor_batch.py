"""Rollout samples -> the trainer's batch, and per-token log-probabilities from the megatron model.

A batch holds whole sequences (prompt + response), right-padded: `input_ids [B, S]`, `labels [B, S]`
(the next token), `loss_mask [B, S]` (1 where the label is a response token), 3-D `position_ids
[3, B, S]` (computed from the images' grids as transformers does), and the images of every sample
(a group's samples repeat their prompt's images). Log-probabilities come from megatron's schedule
(pipeline-aware) as log_softmax(logits / T) at the labels through megatron's vocab-parallel cross
entropy, so TP-sharded logits are never gathered; under CP each rank scores its own chunks and the
results are reassembled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_vlm.models.mrope import get_rope_index
from megatron_vlm.parallel.batching import merge_from_cp, split_for_cp
from megatron_vlm.rollout.embedded import Prepared
from megatron_vlm.rollout.protocol import RolloutSample


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor        # [B, S]
    labels: torch.Tensor           # [B, S]
    loss_mask: torch.Tensor        # [B, S] float
    position_ids: torch.Tensor     # [3, B, S]
    mm_token_type_ids: torch.Tensor  # [B, S] 1 at image positions of the prompt
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    def select(self, rows: slice, images_per_row: list[int], patches_per_image: list[int]) -> "SequenceBatch":
        """Rows `rows` with their images (images are stored in row order)."""
        first_image = sum(images_per_row[: rows.start])
        last_image = sum(images_per_row[: rows.stop])
        pixels = grid = None
        if self.pixel_values is not None and last_image > first_image:
            start = sum(patches_per_image[:first_image])
            stop = sum(patches_per_image[:last_image])
            pixels, grid = self.pixel_values[start:stop], self.image_grid_thw[first_image:last_image]
        return SequenceBatch(self.input_ids[rows], self.labels[rows], self.loss_mask[rows],
                             self.position_ids[:, rows], self.mm_token_type_ids[rows], pixels, grid)


def build_batch(samples: list[RolloutSample], prepared: dict[str, Prepared], pad_id: int,
                spatial_merge_size: int, multiple_of: int = 1) -> tuple[SequenceBatch, list[int], list[int]]:
    """Sequences of `samples` (prepared[request_id] holds their prompt's processor output).
    Returns the batch plus images per row and patches per image (for micro-batch slicing)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)
    width += (-width) % multiple_of
    rows = len(samples)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    types = torch.zeros((rows, width), dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    loss_mask = torch.zeros((rows, width))
    pixels, grids, images_per_row = [], [], []
    for row, sample in enumerate(samples):
        prep = prepared[sample.request_id]
        prompt, response = len(sample.prompt_ids), len(sample.response_ids)
        ids[row, :prompt + response] = torch.tensor(sample.prompt_ids + sample.response_ids)
        types[row, :prompt] = prep.mm_token_type_ids
        attention[row, :prompt + response] = 1
        loss_mask[row, prompt - 1: prompt + response - 1] = 1.0  # positions predicting the response
        n_images = 0 if prep.image_grid_thw is None else len(prep.image_grid_thw)
        images_per_row.append(n_images)
        if n_images:
            pixels.append(prep.pixel_values)
            grids.append(prep.image_grid_thw)
    grid = torch.cat(grids) if grids else None
    position_ids, _ = get_rope_index(types, grid, spatial_merge_size, attention)
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), pad_id, dtype=torch.long)], dim=1)
    patches = grid.prod(-1).tolist() if grid is not None else []
    batch = SequenceBatch(ids, labels, loss_mask, position_ids, types,
                          torch.cat(pixels) if pixels else None, grid)
    return batch, images_per_row, patches


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T)[label] with vocab-parallel logits [b, s, V/tp] -> [b, s]."""
    from megatron.core import tensor_parallel

    scaled = logits.float() / temperature
    # megatron's kernel works on [s, b, V/tp] and returns -log p
    return -tensor_parallel.vocab_parallel_cross_entropy(
        scaled.transpose(0, 1).contiguous(), labels.transpose(0, 1).contiguous()).transpose(0, 1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / T) per token [b, s] from vocab-parallel logits [b, s, V/tp]
    (a metric: max, sum-exp and sum(p * z) are reduced over the TP group, nothing of size V)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    z = logits.float() / temperature
    row_max = z.max(-1).values
    torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
    e = torch.exp(z - row_max[..., None])
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
    torch.distributed.all_reduce(sums, group=group)
    return row_max + torch.log(sums[0]) - sums[1] / sums[0]


def forward_logprobs(model, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """Log-probs of this rank's CP chunks [b, s_local] (a differentiable forward)."""
    from megatron.core import parallel_state as ps

    logits = model(batch.input_ids, batch.position_ids, pixel_values=batch.pixel_values,
                   image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids)
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    return token_logprobs(logits, split_for_cp(batch.labels, cp, cp_rank), temperature)


@torch.no_grad()
def score(model, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """Full-sequence log-probs [B, S] on every rank (single pipeline stage; CP chunks merged)."""
    from megatron.core import parallel_state as ps

    local = forward_logprobs(model, batch, temperature)
    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(cp)]
    torch.distributed.all_gather(pieces, local.contiguous(), group=ps.get_context_parallel_group())
    return merge_from_cp(pieces, seq_dim=1)


def response_logprobs(full: torch.Tensor, batch: SequenceBatch) -> list[list[float]]:
    """Per-sample lists of response-token log-probs (the loss-mask positions, in order)."""
    return [row[mask.bool()].tolist() for row, mask in zip(full, batch.loss_mask)]
