"""Where the trainer's tensors live: micro-batches on the model's device, collective tensors on the
group's device.

The CPU cannot show a GPU, so the device under test is `meta` where a stand-in non-host device
works (a pack moved there, metric totals reduced there), and elsewhere a real one-rank gloo step
shows that every path goes through the one place a batch is moved (`PackedMicroBatch.to`, through
`megatron_step.on_device`) and that every tensor handed to a collective is on
`collective_device(group)`.
"""
from dataclasses import fields

import pytest
import torch

from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.rl.losses import LossConfig
from megatron_vlm.rl.preference import PreferenceConfig
from megatron_vlm.trainer import megatron_step, rl_step
from megatron_vlm.trainer.actor_batch import PackedMicroBatch, build_batch, pack_rows, score
from megatron_vlm.config import OptimConfig
from megatron_vlm.trainer.megatron_step import collective_device, device_for_backend, to_device
from megatron_vlm.trainer.preference import pair_batch, preference_step
from megatron_vlm.rl.config import UpdateConfig
from megatron_vlm.trainer.rl_step import reduce_metrics, score_rows, update
from megatron_vlm.trainer.sft import labelled_sample, sft_step
from tests.rollout.test_embedded import fixture_requests
from tests.trainer.policy_fixtures import build_policy, tiny_policy_weights

META = torch.device("meta")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor")


def _batch(answer=(11, 12, 7)):
    requests, prepared = fixture_requests()
    samples = [labelled_sample(r.request_id, prepared[r.request_id].input_ids.tolist(), list(answer))
               for r in requests]
    return build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)


# -- the helpers' choices ----------------------------------------------------------------------
def test_collective_device_is_the_cuda_device_for_nccl_and_the_host_for_gloo(monkeypatch, single_rank_runtime):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert device_for_backend("nccl") == torch.device("cuda", 3)
    assert device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)
    assert device_for_backend("gloo") == torch.device("cpu")
    assert collective_device() == torch.device("cpu")  # this process's world is gloo


def test_packed_microbatch_to_moves_every_tensor_field():
    batch, images, patches = _batch()
    rows, width = batch.input_ids.shape
    batch.routed_experts = torch.zeros(rows, width, 2, 2, dtype=torch.int16)  # routing replay's routes
    # images, text, tail padding; CP rank 1 of 2 (its token positions are a tensor field too)
    packed = pack_rows(batch, [2, 0, 1], images, patches, pad_to_multiple=8, cp=(2, 1))
    tensor_fields = [f.name for f in fields(PackedMicroBatch) if torch.is_tensor(getattr(packed, f.name))]
    # every field but the Python lists and the CP size is a tensor in this pack: none can be left out below
    assert set(tensor_fields) == {f.name for f in fields(PackedMicroBatch)} - {"rows", "lengths", "spans", "cp_size"}
    moved = packed.to(META)
    for name in tensor_fields:
        before, after = getattr(packed, name), getattr(moved, name)
        assert after.device == META, name
        assert (after.dtype, after.shape) == (before.dtype, before.shape), name
        assert before.device.type == "cpu", name  # a new pack; the host one is left as it was
    assert (moved.rows, moved.lengths) == (packed.rows, packed.lengths)
    params = moved.packed_seq_params()  # built without reading the device (max_seqlen from lengths)
    assert params.cu_seqlens_q.device == META and params.cu_seqlens_q_padded.device == META
    assert params.max_seqlen_q == packed.packed_seq_params().max_seqlen_q == max(packed.lengths)


def test_to_device_moves_a_trainer_microbatch():
    batch, images, patches = _batch()
    packed = pack_rows(batch, [0, 1], images, patches)
    mb = {"batch": packed, "old_logprobs": packed.take(batch.loss_mask), "ref_logprobs": None, "silent": True}
    moved = to_device(mb, META)
    assert moved["batch"].input_ids.device == META and moved["old_logprobs"].device == META
    assert moved["ref_logprobs"] is None and moved["silent"] is True
    lm = to_device({"tokens": torch.zeros(2, 4, dtype=torch.long), "loss_mask": torch.ones(2, 4)}, META)
    assert all(t.device == META for t in lm.values())


# -- every forward entry, one rank -------------------------------------------------------------
@pytest.fixture
def policy(single_rank_runtime):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # see test_optimizer_reset.py
    hf, family, _, full = tiny_policy_weights(seed=4, aux_loss=False)
    return build_policy(family, hf, full, ParallelConfig(), OptimConfig(lr=1e-3), total_steps=4,
                        distributed_optimizer=False)


def _run_every_entry(model, ddp, optimizer, scheduler):
    """SFT, scoring (old and reference log-probs share score_rows), the GRPO update, a DPO step and
    the single-pack score, each once."""
    batch, images, patches = _batch()
    sft_step([ddp], optimizer, scheduler, batch, images, patches, micro_batch_size=2)
    old = score_rows(model, batch, images, patches, 1.0, micro_batch_size=2)
    advantages = batch.loss_mask * torch.tensor([1.0, -1.0, 0.5])[:, None]
    update([ddp], optimizer, scheduler, batch, images, patches, old, advantages,
           UpdateConfig(micro_batch_size=2, loss=LossConfig(name="dapo", kl_type="k3", kl_coef=0.1)),
           ref_logprobs=old)
    requests, prepared = fixture_requests()
    pairs = pair_batch([(requests[0], [11, 12, 7], [13, 7]), (requests[2], [14, 7], [15, 16, 17, 7])],
                       lambda r: prepared[r.request_id], pad_id=0, spatial_merge_size=2)
    ref = score_rows(model, pairs.batch, pairs.images_per_row, pairs.patches, 1.0, micro_batch_size=2)
    preference_step([ddp], optimizer, scheduler, pairs.batch, pairs.images_per_row, pairs.patches, ref,
                    PreferenceConfig(name="dpo"), micro_batch_size=2)
    return score(model, batch, 1.0)


def test_every_forward_takes_a_moved_microbatch(monkeypatch, policy):
    model, ddp, optimizer, scheduler = policy
    moved, forwards = [], []
    move = PackedMicroBatch.to

    def recording_move(self, device):
        out = move(self, device)
        moved.append((out.input_ids, torch.device(device)))
        return out

    monkeypatch.setattr(PackedMicroBatch, "to", recording_move)
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(args[0]), with_kwargs=True)
    try:
        _run_every_entry(*policy)
    finally:
        hook.remove()
    assert len(forwards) >= 6
    for input_ids in forwards:  # the very tensor a move returned, moved to the model's device
        devices = [device for ids, device in moved if ids is input_ids]
        assert devices == [megatron_step.model_device(model)], "a forward ran on a pack that was never moved"


def test_every_collective_tensor_is_on_its_groups_device(monkeypatch, policy):
    seen = []
    for name in COLLECTIVES:
        original = getattr(torch.distributed, name)

        def recording(*args, _original=original, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
            seen.append(([t.device for t in tensors], kwargs.get("group")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.distributed, name, recording)
    _run_every_entry(*policy)
    assert len(seen) >= 5  # the metric reductions at least
    for devices, group in seen:
        assert devices and all(d == collective_device(group) for d in devices)


def test_metric_totals_are_reduced_on_the_groups_device(monkeypatch, single_rank_runtime):
    """With the group's device played by `meta`, both reductions (DP x CP, then PP) get meta
    tensors: the totals are built there and the host metrics moved there. Reading a meta result
    back to the host then fails, after the reductions under test."""
    reduced = []
    monkeypatch.setattr(rl_step, "collective_device", lambda group=None: META)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, **kwargs: reduced.append(tensor.device))
    outputs = [{"lm loss": torch.tensor([2.0, 4.0]), "entropy": torch.tensor([1.0, 4.0])}]
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        reduce_metrics(outputs)
    assert reduced == [META, META]


def test_lm_forward_backward_moves_batches_and_reduces_on_the_groups_device(monkeypatch, single_rank_runtime):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_vlm.models.language import LanguageModelConfig, build_language_model, transformer_config

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # see test_optimizer_reset.py
    cfg = LanguageModelConfig(num_layers=2, dense_layers=[0], vocab_size=64)
    model = build_language_model(cfg, transformer_config(cfg, ParallelConfig(), "cpu", calculate_per_token_loss=True),
                                 "cpu")
    ddp = megatron_step.wrap_ddp(model, distributed_optimizer=False)
    g = torch.Generator().manual_seed(0)
    mbs = [{"tokens": torch.randint(0, 64, (2, 8), generator=g), "position_ids": torch.arange(8).expand(2, 8),
            "labels": torch.randint(0, 64, (2, 8), generator=g), "loss_mask": torch.ones(2, 8)} for _ in range(2)]
    moved, forwards = [], []
    move = megatron_step.host_to_device
    monkeypatch.setattr(megatron_step, "host_to_device", lambda t, device: moved.append(move(t, device)) or moved[-1])
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(args[0]), with_kwargs=True)
    with torch.no_grad():
        metrics = megatron_step.forward_backward([ddp], mbs, forward_only=True)
    hook.remove()
    assert metrics["tokens"] == 32 and len(forwards) == 2
    assert all(any(t is ids for t in moved) for ids in forwards)
    reduced = []
    monkeypatch.setattr(megatron_step, "collective_device", lambda group=None: META)
    original = torch.distributed.all_reduce

    def recording(tensor, **kwargs):
        if tensor.device == META:  # ours; megatron's own reductions run as they are
            return reduced.append(tensor.device)
        return original(tensor, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", recording)
    with torch.no_grad(), pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        megatron_step.forward_backward([ddp], mbs, forward_only=True)
    assert reduced == [META, META]
