"""A tiny Qwen3-VL-MoE policy for the trainer tests: HF weights in megatron names, and the megatron
model + DDP + optimizer built from them at a given layout."""
from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict
from megatron_vlm.models import family_for
from megatron_vlm.trainer.megatron_step import build_optimizer, wrap_ddp
from tests.models.vlm_fixtures import make_hf_model


def tiny_policy_weights(seed: int, aux_loss: bool = True):
    """(hf model, family, HF rules, full megatron state). Without the router's load-balancing
    loss (aux_loss=False) a loss does not depend on how tokens are grouped into micro-batches."""
    hf = make_hf_model("qwen3_vl_moe", seed=seed)
    if not aux_loss:
        hf.config.text_config.router_aux_loss_coef = 0.0
    family = family_for(hf.config)
    rules = family.hf_rules(hf.config)
    return hf, family, rules, dict(hf_to_mcore(rules, hf.state_dict().__getitem__))


def build_policy(family, hf, full, parallel, optim, total_steps: int = 1, distributed_optimizer: bool = True,
                 **config_overrides):
    """(model, ddp, optimizer, scheduler) at the current layout, weights from `full`."""
    model = family.build(hf.config, parallel, "cpu", calculate_per_token_loss=True, **config_overrides)
    load_full_state_dict(model, full, RankLayout.current(model.config))
    ddp = wrap_ddp(model, distributed_optimizer=distributed_optimizer)
    optimizer, scheduler = build_optimizer([ddp], optim, distributed_optimizer, total_steps=total_steps)
    return model, ddp, optimizer, scheduler


def build_sgd_policy(family, hf, full, parallel, lr: float):
    """(model, ddp, optimizer, scheduler) with plain SGD at a constant `lr` (no momentum, weight
    decay or clipping; the grad norm is still reported), so that a test reads one step's gradient
    back as (before - after) / lr."""
    import torch
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = family.build(hf.config, parallel, "cpu", calculate_per_token_loss=True)
    load_full_state_dict(model, full, RankLayout.current(model.config))
    ddp = wrap_ddp(model, distributed_optimizer=False)  # megatron's distributed optimizer is Adam only
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="sgd", lr=lr, sgd_momentum=0.0, weight_decay=0.0, clip_grad=1e30,  # never clips
        use_distributed_optimizer=False, params_dtype=torch.float32), [ddp])
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.grad_scale_func = optimizer.scale_loss
    model.config.no_sync_func = ddp.no_sync
    scheduler = OptimizerParamScheduler(optimizer, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0,
                                        lr_decay_steps=1, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=1, wd_incr_style="constant")
    return model, ddp, optimizer, scheduler
