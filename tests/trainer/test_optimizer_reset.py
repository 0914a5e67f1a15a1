"""reset_optimizer_state: after it, a step equals a freshly built optimizer's first step."""
import torch

from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.trainer.actor_batch import build_batch
from megatron_vlm.config import OptimConfig
from megatron_vlm.trainer.megatron_step import reset_optimizer_state
from megatron_vlm.trainer.sft import labelled_sample, sft_step
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import build_policy, tiny_policy_weights

OPTIM = OptimConfig(lr=1e-3, adam_eps=1e-6, clip_grad=0.0)


def _policy(family, hf, full):
    return build_policy(family, hf, full, ParallelConfig(), OPTIM, total_steps=10, distributed_optimizer=False)


def _batch(prepared, requests, answer):
    samples = [labelled_sample(r.request_id, prepared[r.request_id].input_ids.tolist(), answer)
               for r in requests]
    return build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)


def test_step_after_reset_equals_a_fresh_optimizers_first_step(single_rank_runtime):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # process-wide megatron state: an earlier test in this process may have left a scale of
    # another shape (its schedule ran without calculate_per_token_loss)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    hf, family, _, full = tiny_policy_weights(seed=4, aux_loss=False)
    requests, prepared = fixture_requests()
    first, second = _batch(prepared, requests, [11, 12, 13]), _batch(prepared, requests, [40, 41])

    def after(reset: bool):
        model, ddp, optimizer, scheduler = _policy(family, hf, full)
        for _ in range(3):
            sft_step([ddp], optimizer, scheduler, *first, micro_batch_size=4)
        moved = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
        if reset:
            reset_optimizer_state(optimizer)
        sft_step([ddp], optimizer, scheduler, *second, micro_batch_size=4)
        return moved, {k: p.detach().clone() for k, p in model.named_parameters()}

    moved, with_reset = after(reset=True)
    _, without_reset = after(reset=False)
    fresh, fresh_ddp, fresh_opt, fresh_sched = _policy(family, hf, full)
    fresh.load_state_dict(moved, strict=False)
    sft_step([fresh_ddp], fresh_opt, fresh_sched, *second, micro_batch_size=4)
    expected = {k: p.detach() for k, p in fresh.named_parameters()}
    gap = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in b)  # noqa: E731
    assert gap(with_reset, moved) > 1e-4          # the step did move the weights
    assert gap(with_reset, expected) < 1e-6       # ... exactly as a fresh optimizer's first step
    assert gap(without_reset, expected) > 1e-4    # Adam's moments of the first batch otherwise
