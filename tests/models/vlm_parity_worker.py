"""One rank of the VLM parity launch: our megatron VLM against transformers' own model.

Every rank builds the same tiny random HF model and inputs (two samples, three images of different
grids), computes transformers' logits, then for each layout builds the megatron model, loads the HF
weights through the family's rules and checkpoint/sharding.py, runs the forward through megatron's
schedule (1F1B pipeline when PP > 1) and gathers logits over TP (vocab) and CP (sequence). Every DP
rank runs the whole batch (this checks the model, not the data split). Also checks `iter_hf_weights`
(gathered over TP / EP / PP) against the HF state dict, bit for bit. Writes max differences as JSON.
"""
import json
import sys
from pathlib import Path

import torch

from megatron_vlm.checkpoint.convert import load_into_model
from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict
from megatron_vlm.checkpoint.streaming import iter_hf_weights
from megatron_vlm.models import family_for
from megatron_vlm.models.mrope import get_rope_index
from megatron_vlm.parallel.batching import merge_from_cp
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from tests.models.vlm_fixtures import make_hf_model, make_inputs, mark_experts_as_transformer_engine_does

LAYOUTS = {
    "tp1": dict(),
    "tp2_ep2": dict(tp=2, ep=2, etp=1),
    "tp2_ep2_etp2": dict(tp=2, ep=2, etp=2),
    # expert params marked partition_dim=0 as Transformer Engine marks them (fc2 is split along 1)
    "tp2_ep2_etp2_te": dict(tp=2, ep=2, etp=2, te_expert_attrs=True),
    "pp2": dict(pp=2),
    "cp2": dict(cp=2),
    "tp2": dict(tp=2),
    "cp2_tp2": dict(cp=2, tp=2),
}


def forward_logits(model, batch):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, module):
        mb = next(data_iterator)
        out = module(mb["input_ids"], mb["position_ids"], pixel_values=mb["pixel_values"],
                     image_grid_thw=mb["image_grid_thw"])
        return out, lambda o: (o.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": o.detach()})

    cp = ps.get_context_parallel_world_size()
    seq_local = batch["input_ids"].shape[1] // cp
    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=seq_local, micro_batch_size=batch["input_ids"].shape[0], forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    logits = out[0]["logits"]
    pieces = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(pieces, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    logits = torch.cat(pieces, dim=-1)
    if cp > 1:
        pieces = [torch.empty_like(logits) for _ in range(cp)]
        torch.distributed.all_gather(pieces, logits.contiguous(), group=ps.get_context_parallel_group())
        logits = merge_from_cp(pieces, seq_dim=1)
    return logits


def main():
    out_path, family_name, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    ckpt_root = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    runtime = init_runtime(ParallelConfig(), seed=3)
    hf = make_hf_model(family_name)
    family = family_for(hf.config)
    inputs = make_inputs()
    with torch.no_grad():
        reference = hf(**inputs).logits
    position_ids, _ = get_rope_index(inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                     hf.config.vision_config.spatial_merge_size)
    batch = dict(inputs, position_ids=position_ids)
    hf_state = hf.state_dict()
    rules = family.hf_rules(hf.config)
    full = dict(hf_to_mcore(rules, hf_state.__getitem__))
    report = {}
    for name in names:
        layout = dict(LAYOUTS[name])
        te_expert_attrs = layout.pop("te_expert_attrs", False)
        parallel = ParallelConfig(**layout)
        set_layout(runtime, parallel, seed=3)
        model = family.build(hf.config, parallel, "cpu")
        if te_expert_attrs:
            mark_experts_as_transformer_engine_does(model)
        load_full_state_dict(model, full, RankLayout.current(model.config), hf.config.tie_word_embeddings)
        model.eval()
        with torch.no_grad():
            logits = forward_logits(model, batch)
            before = [p.detach().clone() for p in model.parameters()]
            exported = {k: v for k, v in iter_hf_weights(model, rules)}
            changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        diff = float((logits - reference).abs().max()) if logits is not None else 0.0
        mismatched = [k for k in hf_state if k not in exported or not torch.equal(exported[k], _hub(k, hf_state[k], exported))]
        values = torch.tensor([diff, float(len(mismatched)), float(len(exported) != len(hf_state)),
                               float(changed)])
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        report[name] = {"logits_max_abs": values[0].item(), "weights_mismatched": values[1].item(),
                        "key_count_differs": values[2].item(), "params_changed_by_export": values[3].item()}
        if ckpt_root is not None and (ckpt_root / name).is_dir():
            # the same layout loaded from `megatron-vlm convert hf-to-mcore` output instead
            model = family.build(hf.config, parallel, "cpu")
            load_into_model(model, str(ckpt_root / name))
            model.eval()
            with torch.no_grad():
                logits = forward_logits(model, batch)
            diff = torch.tensor(float((logits - reference).abs().max()) if logits is not None else 0.0)
            torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
            report[name]["checkpoint_logits_max_abs"] = diff.item()
        if mismatched and runtime.rank == 0:
            print("mismatched", name, mismatched[:5], flush=True)
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


def _hub(name, tensor, exported):
    """HF in-memory experts are [E, out, in]; iter_hf_weights yields the Hub layout [E, in, out]."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and name in exported \
            and exported[name].shape != tensor.shape:
        return tensor.transpose(1, 2)
    return tensor


if __name__ == "__main__":
    main()
