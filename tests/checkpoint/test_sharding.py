"""The expert split layout comes from our name table, whatever `partition_dim` the layer set.

Transformer Engine's expert linears (built by megatron with `parallel_mode=None` when EP > 1 or
expert TP > 1) carry `partition_dim=0` on every weight, `linear_fc2` included. No TE here: the
tests set that attribute on a CPU-built model, as TE would. The multi-rank half (expert TP = 2,
where the wrong dim would cut and gather fc2 the wrong way) is the `tp2_ep2_etp2_te` layout of
tests/models/test_vlm_parity.py.
"""
import torch

from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict, split_dim
from megatron_vlm.models import family_for
from megatron_vlm.parallel.config import ParallelConfig
from tests.models.vlm_fixtures import make_hf_model, mark_experts_as_transformer_engine_does


def test_split_dim_of_experts_ignores_the_attribute():
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    weight.tensor_model_parallel, weight.partition_dim = True, 0
    fc2 = "language.decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"
    assert split_dim(fc2, weight) == 1
    assert split_dim(fc2.replace("fc2", "fc1"), weight) == 0
    assert split_dim("language.decoder.layers.1.self_attention.linear_proj.weight", weight) == 0


def test_experts_marked_as_transformer_engine_does_still_load(single_rank_runtime):
    from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
    from megatron_vlm.checkpoint.streaming import iter_hf_weights

    hf = make_hf_model("qwen3_vl_moe")
    family = family_for(hf.config)
    rules = family.hf_rules(hf.config)
    model = family.build(hf.config, ParallelConfig(), "cpu")
    assert mark_experts_as_transformer_engine_does(model) > 0
    full = dict(hf_to_mcore(rules, hf.state_dict().__getitem__))
    load_full_state_dict(model, full, RankLayout.current(model.config))  # raised AssertionError
    exported = dict(iter_hf_weights(model, rules))
    down = next(k for k in exported if k.endswith("experts.down_proj"))
    assert torch.equal(exported[down], hf.state_dict()[down].transpose(1, 2))  # Hub layout [E, I, H]
