"""One policy update from scored rollouts: advantages, old / reference log-probs, the policy loss
over packed micro-batches through megatron's schedule, the optimizer step.

Micro-batches are packed (actor_batch.pack_rows): `kernels.packing.plan_packs` deals the rows of
each mini-batch to DP ranks (Karmarkar-Karp on a per-sample cost) and packs each rank's rows into
the same number of micro-batches of at most `pack_tokens` tokens (the pipeline schedule, and the
expert-parallel all-to-alls, need every rank to run as many). A micro-batch left without rows (a DP
rank with fewer rows than micro-batches) runs one fully masked row so that every rank joins the
reductions. The loss comes from the last stage's hidden states: the clipped-ratio losses through
`kernels.policy_loss.fused_linear_policy_loss` (head, log-probs, loss and gradients in one op), the
others (intern_s1) through `kernels.logprobs.linear_logprobs` and `policy_loss_fn`.

Loss normalisation is exact across micro-batches and DP ranks: each micro-batch returns the
*unnormalised* sum of its aggregation units (the loss with normalizer=1) and the number of units
(tokens for token-mean, non-empty sequences for the seq-mean modes); megatron
(`calculate_per_token_loss=True`) sums gradients over micro-batches and DP ranks and divides once by
the global unit count. seq-mean-token-sum-norm (Dr. GRPO) counts each real sequence of a pack as
L units, L one constant for the whole update (`max_response_len`: the GRPO stage passes
rollout.max_new_tokens), so the global divisor is sequences x L as in the paper and verl.

Rollout correction (`update.rollout_correction`): the engine's per-token log-probs travel in the
micro-batches beside the old log-probs; `_loss_func` turns the two into the weight on the PG term
(`megatron_vlm.rl.rollout_correction`, whole sequences are in one pack, so the sequence-level
variants see every token) and reports its metrics like the loss's own.

Scoring (score_rows: old and reference log-probs) is split the same way: each DP rank runs the
forward on its own share of the rows only, and the shares' real tokens are all-gathered over the DP
group, so the work per rank falls as DP grows and every rank still holds the full [B, S] result.

Micro-batches are packed on the host and moved to the model's device by `megatron_step.on_device`
as the schedule takes them (train_step, score_rows); metric totals, gathered and broadcast log-probs
are on the group's device (`megatron_step.collective_device`).
"""
from __future__ import annotations

from functools import partial

import torch

from kernels.packing import PackCost, plan_packs
from kernels.policy_loss import SeqLayout, fused_linear_policy_loss
from megatron_vlm.rl.advantages import AdvantageConfig, AdvantageInputs, compute_advantages, group_index_from_ids
from megatron_vlm.rl.config import UpdateConfig
from megatron_vlm.rl.losses import LossInputs, kernel_policy_config, policy_loss_fn
from megatron_vlm.rl.rollout_correction import CorrectionInputs, ratio_quantiles, rollout_correction_fn
from megatron_vlm.trainer.actor_batch import (SequenceBatch, cp_coordinates, fixed_pack_length, forward_hidden,
                                              head_parallelism, loss_cp_group, pack_padding, pack_rows,
                                              packed_logprobs)
from megatron_vlm.trainer.megatron_step import collective_device, model_device, on_device
from megatron_vlm.trainer.routing_replay import route_match_metrics

# Metrics that are sums in the loss's own units (the loss called with normalizer=1); the others
# are masked token means of their micro-batch.
UNIT_SUMS = ("pg_loss", "kl_loss", "nll_loss")


def sequence_advantages(rewards: torch.Tensor, group_ids: list, loss_mask: torch.Tensor,
                        cfg: AdvantageConfig) -> torch.Tensor:
    """Per-token advantages [B, S] (zero off the response) from one reward per sample."""
    rows, width = loss_mask.shape
    cu = torch.arange(rows + 1) * width
    adv = compute_advantages(AdvantageInputs(rewards.float(), group_index_from_ids(group_ids),
                                             loss_mask.reshape(-1), cu), cfg)
    return adv.reshape(rows, width) * loss_mask


def aggregation_units(mask: torch.Tensor, cu_seqlens: torch.Tensor, mode: str, sequences: int | None = None,
                      max_response_len: int | None = None, cp_group=None) -> torch.Tensor:
    """How many units the aggregation divides by, for packed [T] tokens: tokens (token-mean),
    non-empty sequences (seq-mean-token-sum / -mean), or sequences x max_response_len
    (seq-mean-token-sum-norm: every sequence, masked or not, as Dr. GRPO's G; `sequences` defaults
    to those in cu_seqlens and max_response_len to the longest of them, the kernel's own default).

    Under context parallelism (`cp_group`; the tokens are this rank's share of each sequence) the
    units are summed over the CP group with the gradients, so tokens count where they are and a
    sequence counts once: on CP rank 0, 0 on the others.
    """
    if mode == "token-mean":
        return mask.sum()
    layout = SeqLayout.build(mask, cu_seqlens, cp_group)
    if cp_group is not None and cp_group.size() > 1 and cp_group.rank() != 0:
        return torch.zeros((), dtype=torch.long, device=mask.device)
    if mode == "seq-mean-token-sum-norm":
        count = len(layout.tokens) if sequences is None else sequences
        return torch.tensor(count * (layout.max_len if max_response_len is None else max_response_len))
    return (layout.tokens > 0).sum()


def unit_report(loss: torch.Tensor, metrics: dict, units: torch.Tensor, mask: torch.Tensor) -> dict:
    """[value * weight, weight] per metric for reduce_metrics: sums in loss units with the unit
    count, token means with the micro-batch's token count."""
    tokens = mask.sum().float()
    report = {"lm loss": torch.stack([loss.detach().float(), units.float()])}
    for name, value in metrics.items():
        if value.dim() == 0:
            value = value.detach().float()
            report[name] = torch.stack([value, units.float()] if name in UNIT_SUMS else [value * tokens, tokens])
    return report


def _loss_func(mb: dict, cfg: UpdateConfig, mode: str, max_response_len: int | None, head: dict,
               sink: list | None, output):
    """This micro-batch's loss from the last stage's output: over this CP rank's tokens (all of
    them without CP), sequence statistics summed over the CP group. mb["old_logprobs"] None: on
    policy, the forward's own detached log-probs are pi_old; `sink` (a list) then receives
    (micro-batch, the whole pack's log-probs) for update's on_logprobs."""
    packed, kcfg, cp_group = mb["batch"], kernel_policy_config(cfg.loss), loss_cp_group(mb["batch"])
    cu, mask, labels = packed.local_cu_seqlens, packed.local(packed.loss_mask), packed.local(packed.labels)
    is_weight, correction = None, {}
    if cfg.rollout_correction is not None:
        is_weight, correction = rollout_correction_fn(
            CorrectionInputs(mb["old_logprobs"], mb["engine_logprobs"], mask, cu, cp_group), cfg.rollout_correction)
    if kcfg is not None:
        hidden, weight = output
        loss, metrics = fused_linear_policy_loss(
            hidden.reshape(-1, hidden.shape[-1]), weight, labels, mb["old_logprobs"], mb["advantages"],
            mask, cu, kcfg, ref_logprobs=mb["ref_logprobs"], normalizer=1.0, temperature=cfg.temperature,
            compute_entropy=True, impl=cfg.loss.impl, is_weight=is_weight, cp_group=cp_group, **head)
        logprobs = metrics.pop("logprobs")
    else:
        logprobs, entropy = packed_logprobs(output, labels, cfg.temperature, head, with_entropy=True,
                                            impl=cfg.loss.impl)
        old = logprobs.detach() if mb["old_logprobs"] is None else mb["old_logprobs"]
        loss, metrics = policy_loss_fn(LossInputs(
            logprobs, old, mb["advantages"], mask, cu, ref_logprobs=mb["ref_logprobs"],
            normalizer=1.0, entropy=entropy.detach(), is_weight=is_weight, cp_group=cp_group), cfg.loss)
    if sink is not None:
        sink.append((mb, packed.gather_cp(logprobs.detach(), cp_group)))
    units = aggregation_units(mask, cu, mode, sequences=len(mb["rows"]), max_response_len=max_response_len,
                              cp_group=cp_group)
    return loss, units.to(torch.int), unit_report(loss, {**metrics, **correction}, units, mask)


def _rl_forward_step(cfg: UpdateConfig, mode: str, max_response_len: int | None, sink: list | None,
                     data_iterator, model):
    mb = next(data_iterator)
    return forward_hidden(model, mb["batch"]), partial(_loss_func, mb, cfg, mode, max_response_len,
                                                       head_parallelism(model), sink)


def pack_budget(pack_tokens: int | None, micro_batch_size: int, batch: SequenceBatch) -> int:
    return pack_tokens if pack_tokens is not None else micro_batch_size * batch.input_ids.shape[1]


def update(model_chunks, optimizer, scheduler, batch: SequenceBatch, images_per_row: list[int],
           patches_per_image: list[int], old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
           cfg: UpdateConfig, ref_logprobs: torch.Tensor | None = None, engine_logprobs: torch.Tensor | None = None,
           max_response_len: int | None = None, on_logprobs=None) -> dict[str, float]:
    """`optimizer_steps` optimizer steps, each over one mini-batch of the rows, packed and dealt to
    the DP ranks. engine_logprobs [B, S]: the rollout engine's log-probs of its sampled tokens,
    needed by `cfg.rollout_correction`. max_response_len: Dr. GRPO's constant L for
    seq-mean-token-sum-norm; None = the batch's longest response (its loss tokens), which is the
    same on every micro-batch and DP rank but moves with the batch, where a fixed budget
    (rollout.max_new_tokens) keeps the loss's scale the same from step to step.

    old_logprobs None: on-policy, one optimizer step (the weights a scoring pass would use are
    the ones the update's forward runs): pi_old is that forward's own detached log-probs, which
    saves the scoring pass. on_logprobs(logprobs [B, S], the same on every rank as score_rows
    gives them) is then called after the forward-backward and before the optimizer step, so a
    check that raises there (the weight-sync check) stops the run with the weights unchanged."""
    kcfg = kernel_policy_config(cfg.loss)
    mode = kcfg.aggregation if kcfg is not None else (cfg.loss.aggregation or "token-mean")
    if mode == "seq-mean-token-sum-norm" and max_response_len is None:
        max_response_len = int(batch.loss_mask.sum(1).max())
    if cfg.rollout_correction is not None and engine_logprobs is None:
        raise ValueError(f"update.rollout_correction ({cfg.rollout_correction.name}) needs the engine's log-probs")
    if old_logprobs is None and (cfg.optimizer_steps != 1 or cfg.rollout_correction is not None):
        raise ValueError("old log-probs from the update's own forward need update.optimizer_steps = 1 (got "
                         f"{cfg.optimizer_steps}) and no update.rollout_correction: pass recomputed ones")
    budget = pack_budget(cfg.pack_tokens, cfg.micro_batch_size, batch)
    metrics: dict[str, float] = {}
    for step_rows in _split(list(range(batch.input_ids.shape[0])), cfg.optimizer_steps):
        microbatches = make_microbatches(batch, images_per_row, patches_per_image, step_rows, budget,
                                         old_logprobs, advantages, ref_logprobs, config=model_chunks[0].config,
                                         engine=engine_logprobs)
        sink = [] if old_logprobs is None and on_logprobs is not None else None  # no hook: nothing gathered
        before_step = None
        if sink is not None:
            before_step = partial(_report_logprobs, on_logprobs, batch, sink, step_rows, budget,
                                  model_device(model_chunks[0]))
        metrics = train_step(model_chunks, optimizer, scheduler, microbatches,
                             partial(_rl_forward_step, cfg, mode, max_response_len, sink), before_step)
    if cfg.rollout_correction is not None:  # the ratios the update started from, over the whole batch
        metrics.update(ratio_quantiles(old_logprobs, engine_logprobs, batch.loss_mask))
    return metrics


def train_step(model_chunks, optimizer, scheduler, microbatches: list[dict], forward_step,
               before_step=None) -> dict[str, float]:
    """One optimizer step over packed micro-batches (megatron's schedule: 1F1B when PP > 1);
    before_step() runs between the forward-backward and the optimizer step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=on_device(microbatches, model_device(model_chunks[0])),
        model=model_chunks, num_microbatches=len(microbatches),
        seq_length=max(mb["batch"].tokens for mb in microbatches), micro_batch_size=1, forward_only=False)
    if before_step is not None:
        before_step()
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise FloatingPointError("optimizer step skipped: non-finite gradients")
    scheduler.step(increment=1)
    metrics = reduce_metrics(out)
    metrics.update(grad_norm=float(grad_norm or 0.0), lr=optimizer.param_groups[0]["lr"])
    routes = route_match_metrics(model_chunks, any(mb["batch"].routed_experts is not None for mb in microbatches))
    metrics.update({f"{name}_update": value for name, value in routes.items()})
    return metrics


def _split(rows: list[int], parts: int) -> list[list[int]]:
    size = -(-len(rows) // parts)  # ceil; 0 rows give `parts` empty lists
    return [rows[i * size:(i + 1) * size] for i in range(parts)]


def make_microbatches(batch: SequenceBatch, images_per_row, patches, rows: list[int], token_budget: int,
                      old, adv, ref, config, dp_size: int | None = None, dp_rank: int | None = None,
                      engine=None) -> list[dict]:
    """This DP rank's packed micro-batches of `rows` (all DP ranks pass the same rows and get the
    same count) with their per-token tensors packed alike (None where not needed). `config` is the
    model's TransformerConfig: TP padding under SP, one pack length when the pipeline needs it."""
    from megatron.core import parallel_state as ps

    dp_size = ps.get_data_parallel_world_size() if dp_size is None else dp_size
    dp_rank = ps.get_data_parallel_rank() if dp_rank is None else dp_rank
    plan = _plan(batch, rows, token_budget, dp_size)
    multiple, cp = pack_padding(config), cp_coordinates(config)
    lengths = batch.row_lengths()
    length = fixed_pack_length(config, ([lengths[r] for r in pack] for rank in plan for pack in rank))
    out = []
    for chosen in plan[dp_rank]:
        packed = pack_rows(batch, chosen or rows[:1] or [0], images_per_row, patches, multiple, length, cp)
        if not chosen:  # no sample here: a fully masked row keeps this rank in the reductions
            packed.loss_mask = torch.zeros_like(packed.loss_mask)
            if packed.routed_experts is not None:  # filler routes, left out of the match share
                packed.routed_experts = torch.full_like(packed.routed_experts, -1)
        local = lambda per_row: packed.local(packed.take(per_row))  # noqa: E731 (this CP rank's tokens)
        out.append({"batch": packed, "rows": chosen, "old_logprobs": local(old), "advantages": local(adv),
                    "ref_logprobs": local(ref),  # rows: [] for the masked stand-in
                    "engine_logprobs": local(engine)})
    return out


def _plan(batch: SequenceBatch, rows: list[int], token_budget: int, dp_size: int) -> list[list[list[int]]]:
    """[dp rank][micro-batch] -> batch rows."""
    if not rows:
        return [[[]] for _ in range(dp_size)]
    lengths = [batch.row_lengths()[r] for r in rows]
    image_tokens = [int(batch.mm_token_type_ids[r].sum()) for r in rows]
    plan = plan_packs(lengths, max(token_budget, max(lengths)), dp_size, image_tokens, PackCost())
    return [[[rows[i] for i in pack] for pack in rank] for rank in plan.microbatches]


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
    dp_cp_group = ps.get_data_parallel_group(with_context_parallel=True)
    totals = torch.zeros(len(names), 2, device=collective_device(dp_cp_group))
    for o in outputs:
        for i, k in enumerate(names):
            if k in o:
                totals[i] += o[k].detach().float().to(totals.device)
    torch.distributed.all_reduce(totals, group=dp_cp_group)
    totals = totals.to(collective_device(pp_group))
    torch.distributed.all_reduce(totals, group=pp_group)
    means = (totals[:, 0] / totals[:, 1].clamp(min=1)).tolist()  # one host sync for all metrics
    return {("loss" if k == "lm loss" else k): mean for k, mean in zip(names, means)}


def score_rows(model, batch: SequenceBatch, images_per_row, patches, temperature: float,
               micro_batch_size: int, pack_tokens: int | None = None, split_over_dp: bool = True,
               metrics: dict | None = None) -> torch.Tensor:
    """Log-probs [B, S] of every row, the same on every rank (0 off the real tokens; on the batch's
    device), with no grad, over packed micro-batches through megatron's forward-only schedule.

    Each DP rank scores its share of the rows (make_microbatches: dealt by token cost, the same
    deterministic plan on every rank, the same number of micro-batches per rank, which the EP
    all-to-alls need), the last pipeline stage all-gathers the shares over the DP group and
    broadcasts the full result to the other stages. TP / CP ranks of one DP rank score the same
    rows. split_over_dp=False scores every row on every DP rank (the unsplit reference). With the
    engine's routes in the batch the forward replays them (a model built for routing replay) and
    `metrics`, if given, receives routing_replay_match."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_size, dp_rank = (ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()) if split_over_dp else (1, 0)
    rows = list(range(batch.input_ids.shape[0]))
    budget = pack_budget(pack_tokens, micro_batch_size, batch)
    mbs = make_microbatches(batch, images_per_row, patches, rows, budget, None, None, None, model.config,
                            dp_size=dp_size, dp_rank=dp_rank)
    device = model_device(model)
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(_score_forward_step, temperature), data_iterator=on_device(mbs, device),
            model=[model], num_microbatches=len(mbs), seq_length=max(mb["batch"].tokens for mb in mbs),
            micro_batch_size=1, forward_only=True)
    routes = route_match_metrics([model], batch.routed_experts is not None)
    if metrics is not None:
        metrics.update(routes)
    return collect_logprobs(batch, [(mb, result["logprobs"]) for mb, result in zip(mbs, out)], rows, budget,
                            dp_size, device)


def _report_logprobs(on_logprobs, batch: SequenceBatch, sink: list, rows: list[int], budget: int, device) -> None:
    from megatron.core import parallel_state as ps

    on_logprobs(collect_logprobs(batch, sink, rows, budget, ps.get_data_parallel_world_size(), device))


def collect_logprobs(batch: SequenceBatch, scored: list[tuple[dict, torch.Tensor]], rows: list[int], budget: int,
                     dp_size: int, device) -> torch.Tensor:
    """[B, S] log-probs of `rows` (0 elsewhere), the same on every rank, from this rank's
    (micro-batch, pack log-probs) pairs: the last pipeline stage writes its packs, all-gathers the
    DP shares (the plan make_microbatches dealt for `rows` and `budget`), and broadcasts the whole
    to the other stages. On the batch's device."""
    from megatron.core import parallel_state as ps

    logprobs = torch.zeros(batch.loss_mask.shape, dtype=batch.loss_mask.dtype, device=device)  # [B, S]
    for mb, packed_logprobs_ in scored:
        if mb["rows"]:  # not the masked stand-in (its row is another pack's, or another rank's)
            mb["batch"].put(packed_logprobs_.to(device), logprobs)
    if dp_size > 1 and ps.is_pipeline_last_stage(ignore_virtual=True):
        shares = [sorted(r for pack in rank for r in pack) for rank in _plan(batch, rows, budget, dp_size)]
        logprobs = gather_rows(logprobs, shares, batch.row_lengths(), ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        logprobs = logprobs.to(collective_device(group))
        torch.distributed.broadcast(logprobs, src=torch.distributed.get_process_group_ranks(group)[-1], group=group)
    return logprobs.to(batch.loss_mask.device)


def gather_rows(values: torch.Tensor, shares: list[list[int]], lengths: list[int], group) -> torch.Tensor:
    """[B, S] with every row filled from the group rank that owns it (shares[rank] = its rows, the
    same lists on every rank). Only real tokens travel: each rank sends its rows' first lengths[r]
    values end to end, padded to the largest share (the sizes follow from `shares`, no extra
    collective)."""
    device = collective_device(group)
    sizes = [sum(lengths[r] for r in share) for share in shares]
    mine = shares[torch.distributed.get_group_rank(group, torch.distributed.get_rank())]
    flat = torch.zeros(max(sizes), dtype=values.dtype, device=device)  # [max share tokens]
    if mine:
        sent = torch.cat([values[r, :lengths[r]] for r in mine])
        flat[:sent.numel()] = sent.to(device)
    received = [torch.empty_like(flat) for _ in shares]
    torch.distributed.all_gather(received, flat, group=group)
    out = torch.zeros_like(values)
    for share, flat_share in zip(shares, received):
        start = 0
        for r in share:
            out[r, :lengths[r]] = flat_share[start:start + lengths[r]].to(out.device)
            start += lengths[r]
    return out


def _score_forward_step(temperature: float, data_iterator, model):
    packed = next(data_iterator)["batch"]

    def keep_logprobs(output):
        logprobs, _ = packed_logprobs(output, packed.local(packed.labels), temperature, head_parallelism(model))
        logprobs = packed.gather_cp(logprobs, loss_cp_group(packed))  # the whole pack's, on every CP rank
        return logprobs.new_zeros(()), logprobs.new_zeros((), dtype=torch.int), {"logprobs": logprobs}

    return forward_hidden(model, packed), keep_logprobs
