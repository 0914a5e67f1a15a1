"""One policy update from scored rollouts: advantages, old / reference log-probs, the policy loss
over micro-batches through megatron's schedule, the optimizer step.

Loss normalisation is exact across micro-batches and DP ranks: each micro-batch returns the
*unnormalised* sum of its aggregation units (the registered loss called with normalizer=1) and the
number of units (tokens for token-mean, non-empty sequences for the seq-mean modes); megatron
(`calculate_per_token_loss=True`) sums gradients over micro-batches and DP ranks and divides once by
the global unit count. Samples are dealt to DP ranks by row; a rank left without rows runs one
all-masked row so that every rank joins the gradient reduction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from megatron_vlm.parallel.batching import split_for_cp
from megatron_vlm.rl.advantages import AdvantageConfig, AdvantageInputs, compute_advantages, group_index_from_ids
from megatron_vlm.rl.losses import LossConfig, LossInputs, policy_loss_fn
from megatron_vlm.trainer.actor_batch import SequenceBatch, token_entropy, token_logprobs


@dataclass(kw_only=True)
class UpdateConfig:
    temperature: float = 1.0
    micro_batch_size: int = 8
    optimizer_steps: int = 1          # optimizer steps per rollout batch (mini-batches)
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"update.temperature must be > 0, got {self.temperature}")
        if self.micro_batch_size < 1 or self.optimizer_steps < 1:
            raise ValueError("update.micro_batch_size and update.optimizer_steps must be >= 1")


def sequence_advantages(rewards: torch.Tensor, group_ids: list, loss_mask: torch.Tensor,
                        cfg: AdvantageConfig) -> torch.Tensor:
    """Per-token advantages [B, S] (zero off the response) from one reward per sample."""
    rows, width = loss_mask.shape
    cu = torch.arange(rows + 1) * width
    adv = compute_advantages(AdvantageInputs(rewards.float(), group_index_from_ids(group_ids),
                                             loss_mask.reshape(-1), cu), cfg)
    return adv.reshape(rows, width) * loss_mask


def aggregation_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """How many units the aggregation divides by, for a [b, s] mask."""
    if mode == "token-mean":
        return mask.sum()
    return (mask.sum(-1) > 0).sum()  # seq-mean-*: non-empty sequences (sum-norm: per sequence)


def _loss_func(extra: dict, cfg: UpdateConfig, mode: str, logits: torch.Tensor):
    from megatron.core import parallel_state as ps

    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    local = {k: split_for_cp(v, cp, cp_rank) if v is not None else None for k, v in extra.items()}
    logprobs = token_logprobs(logits, local["labels"], cfg.temperature)  # [b, s_local]
    rows, width = logprobs.shape
    cu = torch.arange(rows + 1, device=logprobs.device) * width
    mask = local["loss_mask"]
    flat = lambda x: x.reshape(-1) if x is not None else None  # noqa: E731
    loss, metrics = policy_loss_fn(LossInputs(
        flat(logprobs), flat(local["old_logprobs"]), flat(local["advantages"]), flat(mask), cu,
        ref_logprobs=flat(local["ref_logprobs"]), normalizer=1.0), cfg.loss)
    units = aggregation_units(mask, mode)
    report = {k: torch.stack([v.detach().float() * units, units.float()]) for k, v in metrics.items()
              if v.dim() == 0}
    report["lm loss"] = torch.stack([loss.detach(), units.float()])
    entropy = token_entropy(logits, cfg.temperature)
    report["entropy"] = torch.stack([(entropy * mask).sum(), mask.sum()])  # token mean
    return loss, units.to(torch.int), report


def _rl_forward_step(cfg: UpdateConfig, mode: str, data_iterator, model):
    mb = next(data_iterator)
    batch: SequenceBatch = mb["batch"]
    logits = model(batch.input_ids, batch.position_ids, pixel_values=batch.pixel_values,
                   image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids)
    extra = {"labels": batch.labels, "loss_mask": batch.loss_mask, "old_logprobs": mb["old_logprobs"],
             "advantages": mb["advantages"], "ref_logprobs": mb.get("ref_logprobs")}
    return logits, partial(_loss_func, extra, cfg, mode)


def dp_rows(total: int) -> list[int]:
    """The rows of a rollout batch this DP rank trains on (dealt round-robin)."""
    from megatron.core import parallel_state as ps

    return list(range(ps.get_data_parallel_rank(), total, ps.get_data_parallel_world_size()))


def update(model_chunks, optimizer, scheduler, batch: SequenceBatch, images_per_row: list[int],
           patches_per_image: list[int], old_logprobs: torch.Tensor, advantages: torch.Tensor,
           cfg: UpdateConfig, ref_logprobs: torch.Tensor | None = None) -> dict[str, float]:
    """`optimizer_steps` optimizer steps over this DP rank's rows of the batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vlm.rl.losses import kernel_policy_config

    kcfg = kernel_policy_config(cfg.loss)
    mode = kcfg.aggregation if kcfg is not None else (cfg.loss.aggregation or "token-mean")
    rows = dp_rows(batch.input_ids.shape[0])
    metrics: dict[str, float] = {}
    for step_rows in _split(rows, cfg.optimizer_steps):
        microbatches = make_microbatches(batch, images_per_row, patches_per_image, step_rows,
                                         cfg.micro_batch_size, old_logprobs, advantages, ref_logprobs)
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        out = get_forward_backward_func()(
            forward_step_func=partial(_rl_forward_step, cfg, mode), data_iterator=iter(microbatches),
            model=model_chunks, num_microbatches=len(microbatches),
            seq_length=batch.input_ids.shape[1], micro_batch_size=cfg.micro_batch_size,
            forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped: non-finite gradients")
        scheduler.step(increment=1)
        metrics = reduce_metrics(out)
        metrics["grad_norm"] = float(grad_norm or 0.0)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics


def _split(rows: list[int], parts: int) -> list[list[int]]:
    size = -(-len(rows) // parts)  # ceil; 0 rows give `parts` empty lists
    return [rows[i * size:(i + 1) * size] for i in range(parts)]


def make_microbatches(batch, images_per_row, patches, rows, micro_batch_size: int, old, adv,
                      ref) -> list[dict]:
    """Micro-batches of `rows` with their per-token tensors (None where not needed)."""
    if not rows:  # this DP rank got no sample: one fully masked row keeps the reductions in step
        rows, silent = [0], True
    else:
        silent = False
    out = []
    for start in range(0, len(rows), micro_batch_size):
        chosen = rows[start:start + micro_batch_size]
        mb = _take_rows(batch, images_per_row, patches, chosen)
        if silent:
            mb.loss_mask = torch.zeros_like(mb.loss_mask)
        index = torch.tensor(chosen)
        pick = lambda x: x[index] if x is not None else None  # noqa: E731
        out.append({"batch": mb, "old_logprobs": pick(old), "advantages": pick(adv),
                    "ref_logprobs": pick(ref)})
    return out


def _take_rows(batch: SequenceBatch, images_per_row, patches, rows: list[int]) -> SequenceBatch:
    pieces = [batch.select(slice(r, r + 1), images_per_row, patches) for r in rows]
    pixels = [p.pixel_values for p in pieces if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in pieces if p.image_grid_thw is not None]
    return SequenceBatch(
        torch.cat([p.input_ids for p in pieces]), torch.cat([p.labels for p in pieces]),
        torch.cat([p.loss_mask for p in pieces]), torch.cat([p.position_ids for p in pieces], dim=1),
        torch.cat([p.mm_token_type_ids for p in pieces]),
        torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None)


def reduce_metrics(outputs: list[dict]) -> dict[str, float]:
    """Unit-weighted means over micro-batches and DP ranks, shared with every pipeline stage.

    Each metric arrives as [value * units, units] per micro-batch (only the last stage has them)."""
    from megatron.core import parallel_state as ps

    names = sorted({k for o in outputs for k in o})
    pp_group = ps.get_pipeline_model_parallel_group()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        holder = [names]
        last = torch.distributed.get_process_group_ranks(pp_group)[-1]
        torch.distributed.broadcast_object_list(holder, src=last, group=pp_group)
        names = holder[0]
    totals = torch.zeros(len(names), 2)
    for o in outputs:
        for i, k in enumerate(names):
            if k in o:
                totals[i] += o[k].detach().float().cpu()
    torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    torch.distributed.all_reduce(totals, group=pp_group)
    return {("loss" if k == "lm loss" else k): float(t[0] / t[1].clamp(min=1)) for k, t in zip(names, totals)}


def score_rows(model, batch: SequenceBatch, images_per_row, patches, temperature: float,
               micro_batch_size: int) -> torch.Tensor:
    """Log-probs [B, S] of every row with no grad, in micro-batches (single pipeline stage)."""
    from megatron_vlm.trainer.actor_batch import score

    out = []
    rows = batch.input_ids.shape[0]
    with torch.no_grad():
        for start in range(0, rows, micro_batch_size):
            chosen = list(range(start, min(rows, start + micro_batch_size)))
            out.append(score(model, _take_rows(batch, images_per_row, patches, chosen), temperature))
    return torch.cat(out)

