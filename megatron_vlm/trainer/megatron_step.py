"""One optimizer step of a megatron model over micro-batches, on any layout.

Wraps megatron's DDP, optimizer and pipeline schedules (1F1B when PP > 1). Losses are per-token
sums with the token count returned beside them (`calculate_per_token_loss=True`): megatron then
sums gradients over DP (and CP) and divides by the global token count once, so any split of a batch
over micro-batches, DP ranks and CP ranks gives the gradient of the full-batch token mean.

A micro-batch is a dict of [b, s_local] tensors: `tokens`, `position_ids`, `labels`, `loss_mask`
(already split for CP with `parallel.batching.split_for_cp`; sequence parallelism splits inside the
model).

Where tensors live: micro-batches are built on the host and reach the model's device in one place,
`on_device`, as the schedule asks for each (pinned, non-blocking copies on CUDA); every tensor
that enters a collective is on `collective_device(group)` (NCCL takes device tensors only; gloo
would hide a host tensor on CPU).
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from megatron_vlm.parallel.devices import collective_device, device_for_backend  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from megatron_vlm.config import OptimConfig


# -- where tensors live ---------------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (a DDP wrapper's are its module's)."""
    return next(model.parameters()).device


def host_to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device`; from the host to CUDA through pinned memory, without blocking the host."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_device(microbatch, device):
    """A micro-batch on `device`: a tensor, an object with its own `.to(device)` (a packed
    micro-batch), or a dict of them; other values (None, flags) as they are."""
    if torch.is_tensor(microbatch):
        return host_to_device(microbatch, device)
    if isinstance(microbatch, dict):
        return {key: to_device(value, device) for key, value in microbatch.items()}
    if callable(getattr(microbatch, "to", None)):
        return microbatch.to(device)
    return microbatch


def on_device(microbatches: Iterable, device) -> Iterator:
    """The micro-batches for a schedule's data_iterator, each moved to `device` when the schedule
    takes it, just before its forward: the one place a batch reaches the model's device."""
    for microbatch in microbatches:
        yield to_device(microbatch, device)


def wrap_ddp(model: torch.nn.Module, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: list, optim: OptimConfig, distributed_optimizer: bool,
                    total_steps: int):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model_chunks[0].config
    if not config.calculate_per_token_loss:
        raise ValueError("build the TransformerConfig with calculate_per_token_loss=True: losses "
                         "here are token sums normalised once by the global token count")
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, use_distributed_optimizer=distributed_optimizer,
            bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        ),
        model_chunks,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [chunk.no_sync for chunk in model_chunks]
    if len(model_chunks) == 1:
        config.no_sync_func = config.no_sync_func[0]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr,
        min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1), lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )
    return optimizer, scheduler


def token_loss(labels: torch.Tensor, loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(sum of masked token losses, token count, metrics) as megatron's schedules expect."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def lm_forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return per_token_loss, partial(token_loss, batch["labels"], batch["loss_mask"])


def forward_backward(model_chunks: list, microbatches: list[dict], forward_only: bool = False,
                     forward_step: Callable = lm_forward_step) -> dict[str, float]:
    """Run megatron's schedule over `microbatches`; returns the token-mean loss over all DP ranks."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    first = microbatches[0]["tokens"]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=on_device(microbatches, model_device(model_chunks[0])),
        model=model_chunks, num_microbatches=len(microbatches), seq_length=first.shape[1],
        micro_batch_size=first.shape[0], forward_only=forward_only,
    )
    # Sum over DP x CP (each holds different tokens), then share with the other pipeline stages.
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    totals = torch.zeros(2, device=collective_device(dp_cp_group))
    for item in losses:  # only the last pipeline stage has losses
        totals += item["lm loss"].detach().float().to(totals.device)
    torch.distributed.all_reduce(totals, group=dp_cp_group)
    totals = totals.to(collective_device(pp_group))
    torch.distributed.all_reduce(totals, group=pp_group)
    loss, tokens = torch.stack([totals[0] / totals[1].clamp(min=1), totals[1]]).tolist()  # one host sync
    return {"loss": loss, "tokens": int(tokens)}


def train_step(model_chunks: list, optimizer, scheduler, microbatches: Iterable[dict],
               forward_step: Callable = lm_forward_step) -> dict[str, float]:
    """Zero grads, forward/backward every micro-batch, optimizer step. Returns loss and grad norm."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(model_chunks, list(microbatches), forward_step=forward_step)
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise FloatingPointError("optimizer step skipped: non-finite gradients")
    scheduler.step(increment=1)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics


def set_constant_lr(optimizer, scheduler, lr: float) -> None:
    """From now on a constant learning rate `lr` (a stage's own rate, e.g. GRPO after SFT)."""
    for group in optimizer.param_groups:
        group["max_lr"], group["min_lr"] = lr, min(group.get("min_lr", lr), lr)
    scheduler.max_lr, scheduler.min_lr = lr, min(scheduler.min_lr, lr)
    scheduler.init_lr = min(scheduler.init_lr, lr)
    scheduler.lr_warmup_steps, scheduler.lr_decay_style = 0, "constant"
    scheduler.step(increment=0)


def reset_optimizer_state(optimizer) -> None:
    """Forget Adam's moments and step counts (in place: megatron keeps references to the state),
    so the next step is a fresh optimizer's first step. For a stage whose gradients differ in scale
    from the last one's (RL after SFT): SFT's second moments would otherwise shrink every RL update."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    with torch.no_grad():
        for opt in inner:
            for state in opt.optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value):
                        value.zero_()
                    elif key == "step":
                        state[key] = 0
