"""Rollout samples -> the trainer's batch, packed micro-batches, and per-token log-probabilities.

A batch holds whole sequences (prompt + response), right-padded: `input_ids [B, S]`, `labels [B, S]`
(the next token), `loss_mask [B, S]` (1 where the label is a response token), 3-D `position_ids
[3, B, S]` (computed from the images' grids as transformers does), `lengths [B]` (real tokens per
row), and the images of every sample (a group's samples repeat their prompt's images).

The padded rows never run through the model. `pack_rows` lays chosen rows end to end as one packed
THD micro-batch [1, T]: each sample's real tokens, its own M-RoPE positions (restarting at 0), its
images in order, `cu_seqlens` for the attention and the loss; the tail is padded so that T divides
by TP under sequence parallelism (the padded boundary goes in `cu_seqlens_padded`, whose last
entry is T, as megatron's THD rotary embedding wants). The model runs in `return_hidden` mode:
log-probs come from the last stage's hidden states and the vocab-parallel head weight through
`kernels.logprobs.linear_logprobs` (TP vocab shards and the SP slice handled there, no [T, V]
logits).

Context parallelism (`pack_rows(..., cp=(size, rank))`): every sample is padded to a multiple of
2*CP and sample i occupies cu_seqlens_padded[i]:cu_seqlens_padded[i+1] (real tokens first); each CP
rank's model sees chunks r and 2*CP-1-r of every sample (`parallel.batching.thd_cp_index`, the cut
Transformer Engine and megatron's THD rotary path make). The pack keeps the whole sequence (the
model cuts its inputs itself); `local` gives the loss its rank's share of any per-token tensor and
`gather_cp` puts the ranks' log-probs back together. Sequence statistics across the cut (a
sample's token count, GSPO's sequence ratio) are summed over the CP group by the loss
(`kernels.policy_loss.SeqLayout`, `cp_group`).

With `build_batch(..., with_routes=True)` the batch also carries the engine's MoE routes per token
(`routed_experts` [B, S, L, k], -1 where there are none) and each pack its share, in pack order:
`forward_hidden` replays them (trainer/routing_replay.py).

Batches and packs are built on the host; a pack reaches the model's device whole, with
`PackedMicroBatch.to` (every tensor field, `cu_seqlens` included: Transformer Engine reads them
there), called by `megatron_step.on_device` just before its forward. Host-side bookkeeping (`put`,
the attention's longest sample) reads the pack's Python `lengths`, never the device tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from kernels.logprobs import linear_logprobs
from kernels.packing import cu_seqlens_from_lengths, thd_params
from megatron_vlm.models.mrope import get_rope_index
from megatron_vlm.parallel.batching import thd_cp_index
from megatron_vlm.rollout.embedded import Prepared
from megatron_vlm.rollout.protocol import RolloutSample
from megatron_vlm.trainer.megatron_step import host_to_device, model_device
from megatron_vlm.trainer.routing_replay import replay_routes


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor        # [B, S]
    labels: torch.Tensor           # [B, S]
    loss_mask: torch.Tensor        # [B, S] float
    position_ids: torch.Tensor     # [3, B, S]
    mm_token_type_ids: torch.Tensor  # [B, S] 1 at image positions of the prompt
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    lengths: torch.Tensor | None = None  # [B] real tokens per row; None = every row is full width
    routed_experts: torch.Tensor | None = None  # [B, S, moe_layers, top_k] int16, the engine's
                                                # routes (trainer/routing_replay.py); -1: none

    def row_lengths(self) -> list[int]:
        if self.lengths is None:
            return [self.input_ids.shape[1]] * self.input_ids.shape[0]
        return self.lengths.tolist()

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
                             self.position_ids[:, rows], self.mm_token_type_ids[rows], pixels, grid,
                             None if self.lengths is None else self.lengths[rows],
                             None if self.routed_experts is None else self.routed_experts[rows])


def build_batch(samples: list[RolloutSample], prepared: dict[str, Prepared], pad_id: int,
                spatial_merge_size: int, with_routes: bool = False) -> tuple[SequenceBatch, list[int], list[int]]:
    """Sequences of `samples` (prepared[request_id] holds their prompt's processor output).
    Returns the batch plus images per row and patches per image (for micro-batch slicing).
    with_routes: the engine's routed experts of every sample go into `routed_experts`."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    width = max(lengths)  # rows never run padded: pack_rows pads each pack for TP / SP
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
        loss_mask[row, prompt - 1: prompt + response - 1] = (  # positions predicting the response
            1.0 if sample.response_mask is None else torch.tensor(sample.response_mask, dtype=torch.float))
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
                          torch.cat(pixels) if pixels else None, grid, torch.tensor(lengths),
                          routed_experts(samples, width) if with_routes else None)
    return batch, images_per_row, patches


def routed_experts(samples: list[RolloutSample], width: int) -> torch.Tensor:
    """[B, width, moe_layers, top_k] int16 from each sample's `metadata["routed_experts"]` ([n, L, k],
    n = prompt + response tokens, or one less: the engine never runs the final token), -1 after n."""
    rows = []
    for sample in samples:
        routes = sample.metadata.get("routed_experts")
        tokens = len(sample.prompt_ids) + len(sample.response_ids)
        if routes is None:
            raise ValueError(f"sample {sample.request_id}/{sample.index} has no routed experts: routing "
                             f"replay needs the engine to return them (the embedded engine's "
                             f"return_routed_experts, rl.vllm.return_routed_experts)")
        routes = torch.as_tensor(routes)
        if routes.dim() != 3 or routes.shape[0] not in (tokens - 1, tokens):
            raise ValueError(f"sample {sample.request_id}/{sample.index}: routed experts of shape "
                             f"{list(routes.shape)}, expected [{tokens} or {tokens - 1}, layers, top_k]")
        if int(routes.max()) >= 2**15:
            raise ValueError(f"routed experts: expert id {int(routes.max())} does not fit int16")
        rows.append(routes)
    shapes = {tuple(r.shape[1:]) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"routed experts of different [layers, top_k] across samples: {sorted(shapes)}")
    out = torch.full((len(rows), width, *rows[0].shape[1:]), -1, dtype=torch.int16)
    for row, routes in enumerate(rows):
        out[row, :routes.shape[0]] = routes.to(torch.int16)
    return out


@dataclass
class PackedMicroBatch:
    """Rows of a SequenceBatch packed end to end as one THD sequence [1, T]."""
    rows: list[int]                # batch rows, in pack order
    lengths: list[int]             # their real tokens
    input_ids: torch.Tensor        # [1, T]
    labels: torch.Tensor           # [T]
    loss_mask: torch.Tensor        # [T] float
    position_ids: torch.Tensor     # [3, 1, T] each sample's own M-RoPE positions
    mm_token_type_ids: torch.Tensor  # [1, T]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    cu_seqlens: torch.Tensor       # [n + 1] int32, the samples' boundaries
    cu_seqlens_padded: torch.Tensor  # [n + 1] int32, the same with the tail padding in the last
    routed_experts: torch.Tensor | None = None  # [T, moe_layers, top_k] the engine's routes, -1: none
    spans: list[int] | None = None  # each sample's padded span (lengths, the last with the tail)
    cp_size: int = 1
    cp_index: torch.Tensor | None = None  # [T / cp] positions of this CP rank's tokens (cp > 1)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def local_cu_seqlens(self) -> torch.Tensor:
        """The samples' boundaries in this CP rank's tokens (each sample keeps 1/cp of its span)."""
        return self.cu_seqlens_padded // self.cp_size

    def local(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """[T, ...] per-token values of the whole pack -> this CP rank's [T / cp, ...]."""
        if values is None or self.cp_index is None:
            return values
        return values.index_select(0, self.cp_index.to(values.device))

    def gather_cp(self, local: torch.Tensor, group) -> torch.Tensor:
        """Every CP rank's [T / cp] values -> the whole pack's [T] (a collective over `group`)."""
        if self.cp_index is None:
            return local
        pieces = [torch.empty_like(local) for _ in range(self.cp_size)]
        torch.distributed.all_gather(pieces, local.contiguous(), group=group)
        full = local.new_zeros(self.tokens)
        for rank, piece in enumerate(pieces):
            full[thd_cp_index(self.boundaries(), self.cp_size, rank).to(full.device)] = piece
        return full

    def to(self, device) -> "PackedMicroBatch":
        """This pack with every tensor field on `device` (pinned, non-blocking copies from the host to
        CUDA); the Python lists stay as they are."""
        return replace(self, **{f.name: host_to_device(getattr(self, f.name), device)
                                for f in fields(self) if torch.is_tensor(getattr(self, f.name))})

    def packed_seq_params(self):
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(**thd_params(self.cu_seqlens, self.cu_seqlens_padded, max_seqlen=max(self.lengths)))

    def take(self, per_row: torch.Tensor | None) -> torch.Tensor | None:
        """[B, S] per-token values -> [T] in pack order (0 on the padding)."""
        if per_row is None:
            return None
        return _concat_rows(per_row, self.rows, self.lengths, self.spans)

    def boundaries(self) -> list[int]:
        """cu_seqlens_padded as a host list (no device read)."""
        out = [0]
        for span in self.spans:
            out.append(out[-1] + span)
        return out

    def put(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """Write [T] values back into their rows of `out` [B, S]."""
        for r, n, start in zip(self.rows, self.lengths, self.boundaries()):
            out[r, :n] = packed[start:start + n]


def pack_rows(batch: SequenceBatch, rows: list[int], images_per_row: list[int] | None = None,
              patches_per_image: list[int] | None = None, pad_to_multiple: int = 1,
              length: int | None = None, cp: tuple[int, int] = (1, 0)) -> PackedMicroBatch:
    """One packed micro-batch of `rows` (their real tokens; images with them). images_per_row /
    patches_per_image locate each row's images; without them `rows` must be every row in order.
    The pack is padded to `length` if given, else to a multiple of `pad_to_multiple` (the tail goes
    into the last sample's padded span). cp = (CP size, this rank): with CP > 1 every sample is
    padded to a multiple of 2*CP first, and the pack records this rank's token positions."""
    cp_size, cp_rank = cp
    lengths = [batch.row_lengths()[r] for r in rows]
    spans = sample_spans(lengths, cp_size)
    cu_seqlens, _ = cu_seqlens_from_lengths(lengths)
    real = sum(spans)
    total = length if length is not None else real + (-real) % pad_to_multiple
    if total < real or total % pad_to_multiple or (total - real) % span_multiple(cp_size):
        raise ValueError(f"a pack of {real} tokens cannot be padded to {total} (multiple of {pad_to_multiple})")
    spans[-1] += total - real
    padded = torch.tensor([0, *spans], dtype=torch.int64).cumsum(0).to(torch.int32)
    cat = lambda per_row: _concat_rows(per_row, rows, lengths, spans)  # noqa: E731
    positions = torch.cat([torch.cat([batch.position_ids[:, r, :n], batch.position_ids.new_zeros(3, span - n)], 1)
                           for r, n, span in zip(rows, lengths, spans)], dim=1)
    pixels, grid = _row_images(batch, rows, images_per_row, patches_per_image)
    routes = None
    if batch.routed_experts is not None:
        none = lambda k: batch.routed_experts.new_full((k, *batch.routed_experts.shape[2:]), -1)  # noqa: E731
        routes = torch.cat([torch.cat([batch.routed_experts[r, :n], none(span - n)])
                            for r, n, span in zip(rows, lengths, spans)])
    index = thd_cp_index(padded.tolist(), cp_size, cp_rank) if cp_size > 1 else None
    return PackedMicroBatch(list(rows), lengths, cat(batch.input_ids)[None], cat(batch.labels),
                            cat(batch.loss_mask), positions[:, None], cat(batch.mm_token_type_ids)[None],
                            pixels, grid, cu_seqlens, padded, routes, spans, cp_size, index)


def span_multiple(cp_size: int) -> int:
    """What every sample's span in a pack is a multiple of: 2*CP under CP (its chunks), else 1."""
    return 2 * cp_size if cp_size > 1 else 1


def sample_spans(lengths: list[int], cp_size: int = 1) -> list[int]:
    """Each sample's span in a pack: its length, padded to a multiple of 2*CP under CP."""
    multiple = span_multiple(cp_size)
    return [n + (-n) % multiple for n in lengths]


def _concat_rows(per_row: torch.Tensor, rows, lengths, spans) -> torch.Tensor:
    """[B, S] -> [sum(spans)]: each row's first n values, then zeros to its span, end to end."""
    return torch.cat([torch.cat([per_row[r, :n], per_row.new_zeros(span - n)])
                      for r, n, span in zip(rows, lengths, spans)])


def _row_images(batch: SequenceBatch, rows, images_per_row, patches_per_image):
    if batch.pixel_values is None:
        return None, None
    if images_per_row is None:
        if list(rows) != list(range(batch.input_ids.shape[0])):
            raise ValueError("pack_rows: a subset of rows needs images_per_row and patches_per_image")
        return batch.pixel_values, batch.image_grid_thw
    pieces = [batch.select(slice(r, r + 1), images_per_row, patches_per_image) for r in rows]
    pixels = [p.pixel_values for p in pieces if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in pieces if p.image_grid_thw is not None]
    return (torch.cat(pixels), torch.cat(grids)) if pixels else (None, None)


def pack_padding(config) -> int:
    """The multiple a pack's length must be for this model config: TP under sequence parallelism
    (of each CP rank's share), 2*CP (every sample's span is one) under context parallelism."""
    cp = config.context_parallel_size
    per_rank = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return math.lcm(span_multiple(cp), cp * per_rank)


def cp_coordinates(config) -> tuple[int, int]:
    """(CP size, this rank's CP rank) for pack_rows."""
    from megatron.core import parallel_state as ps

    if config.context_parallel_size == 1:
        return 1, 0
    return config.context_parallel_size, ps.get_context_parallel_rank()


def loss_cp_group(packed: PackedMicroBatch):
    """The CP group a pack's loss sums its sequence statistics over; None without CP."""
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group() if packed.cp_size > 1 else None


def fixed_pack_length(config, pack_lengths) -> int | None:
    """One padded length for every pack of every rank when shapes must agree across ranks (no
    variable_seq_lengths): the pipeline's p2p shapes (PP > 1) and megatron's allgather token
    dispatcher (a plain all-gather over TP x EP), from each pack's sample lengths (a list per
    pack, each sample padded as pack_rows pads it under CP); None otherwise."""
    if config.variable_seq_lengths:
        return None
    longest = max(sum(sample_spans(lengths, config.context_parallel_size)) for lengths in pack_lengths)
    return longest + (-longest) % pack_padding(config)


def forward_hidden(model, mb: PackedMicroBatch):
    """The model on one pack, already on the model's device (`PackedMicroBatch.to`): (hidden
    [1, T(/tp), H], head weight [V/tp, H]) on the last pipeline stage, the activations to pass on
    elsewhere. With the engine's routes in the pack, the MoE layers replay them (routing_replay.py)."""
    with replay_routes(model, mb.local(mb.routed_experts)):
        return model(mb.input_ids, mb.position_ids, pixel_values=mb.pixel_values,
                     image_grid_thw=mb.image_grid_thw, mm_token_type_ids=mb.mm_token_type_ids,
                     packed_seq_params=mb.packed_seq_params(), return_hidden=True)


def head_parallelism(model) -> dict:
    """linear_logprobs / fused_linear_policy_loss keyword arguments for this model's head."""
    from megatron.core import parallel_state as ps

    return dict(tp_group=ps.get_tensor_model_parallel_group(), sequence_parallel=model.config.sequence_parallel)


def packed_logprobs(output, labels: torch.Tensor, temperature: float, head: dict,
                    with_entropy: bool = False, impl: str = "auto"):
    """(log-probs [T], entropy [T] or None) from forward_hidden's last-stage output."""
    hidden, weight = output
    return linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels, temperature,
                           with_entropy=with_entropy, impl=impl, **head)


@torch.no_grad()
def score(model, batch: SequenceBatch, temperature: float) -> torch.Tensor:
    """Log-probs [B, S] of every row (0 off the real tokens) as one pack, on every rank (a single
    pipeline stage; `rl_step.score_rows` is the micro-batched, pipeline-aware version). On the
    batch's device."""
    mb = pack_rows(batch, list(range(batch.input_ids.shape[0])), pad_to_multiple=pack_padding(model.config),
                   cp=cp_coordinates(model.config))
    mb = mb.to(model_device(model))
    logprobs, _ = packed_logprobs(forward_hidden(model, mb), mb.local(mb.labels), temperature, head_parallelism(model))
    logprobs = mb.gather_cp(logprobs, loss_cp_group(mb))
    out = torch.zeros(batch.loss_mask.shape, dtype=batch.loss_mask.dtype, device=logprobs.device)
    mb.put(logprobs, out)
    return out.to(batch.loss_mask.device)


def response_logprobs(full: torch.Tensor, batch: SequenceBatch, loss_mask: torch.Tensor | None = None) -> list[list[float]]:
    """Per-sample lists of response-token log-probs (the loss-mask positions, in order; `loss_mask`
    instead of the batch's when given)."""
    return [row[mask.bool()].tolist() for row, mask in zip(full, batch.loss_mask if loss_mask is None else loss_mask)]
