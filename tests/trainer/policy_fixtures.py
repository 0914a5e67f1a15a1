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
