"""One rank of the init_from launch (2 gloo ranks): the policy `build_policy` builds from an HF
directory and from `convert hf-to-mcore` output equals the full load (every HF tensor read whole,
converted and cut for this rank), parameter for parameter, bit for bit, at several layouts; from the
HF directory each rank reads exactly its own parameters' bytes, counted by the reader.

argv: OUT.json ROOT, where ROOT/<family>/hub is an HF dir and ROOT/<family>/<layout> its
conversion for that layout (written by test_init_from.py). Writes per layout the largest
difference and the bytes read, maxed / summed over ranks.
"""
import json
import sys
from pathlib import Path

import torch

from megatron_vlm.checkpoint import convert
from megatron_vlm.checkpoint.hf_io import HFCheckpointReader
from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
from megatron_vlm.checkpoint.sharding import (RankLayout, canonical_name, is_expert_param,
                                              load_full_state_dict, split_dim)
from megatron_vlm.config import load_config
from megatron_vlm.models import family_for
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from megatron_vlm.trainer.context import build_policy

LAYOUTS = {  # family -> layout name -> parallel settings
    "qwen3_vl_moe": {"tp2_ep2": dict(tp=2, ep=2, etp=1), "tp2_etp2": dict(tp=2), "ep2": dict(ep=2),
                     "pp2": dict(pp=2)},
    "qwen3_vl": {"tp2": dict(tp=2), "pp2": dict(pp=2)},  # tied embeddings: output layer on stage 2
}


class CountingReader(HFCheckpointReader):
    """The reader `load_weights` uses, remembered so its byte count can be read afterwards."""
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountingReader.made.append(self)


def policy(runtime, family, hf_config, parallel: dict, init_from: str):
    overrides = [f"vlm.init_from={init_from}", "stages=[{kind: sft, steps: 1}]",
                 *(f"parallel.{k}={v}" for k, v in parallel.items())]
    return build_policy(load_config(None, overrides), runtime, family, hf_config)[0]


def full_load(family, hf_config, hub: Path, parallel: ParallelConfig):
    """The reference: every tensor read whole, converted, cut for this rank."""
    reader = HFCheckpointReader(hub)
    full = dict(hf_to_mcore(family.hf_rules(hf_config), reader.get))
    model = family.build(hf_config, parallel, "cpu", calculate_per_token_loss=True)
    load_full_state_dict(model, full, RankLayout.current(model.config), hf_config.tie_word_embeddings)
    return model, reader.bytes_read


def max_diff(model, reference) -> float:
    theirs = dict(reference.named_parameters())
    return max(float((p - theirs[n]).abs().max()) for n, p in model.named_parameters())


def main():
    out_path, root = sys.argv[1], Path(sys.argv[2])
    runtime = init_runtime(ParallelConfig(), seed=3)
    convert.HFCheckpointReader = CountingReader  # what load_weights constructs
    report = {}
    for family_name, layouts in LAYOUTS.items():
        hub = root / family_name / "hub"
        hf_config = HFCheckpointReader(hub).config()
        family = family_for(hf_config)
        for name, settings in layouts.items():
            parallel = ParallelConfig(**settings)
            runtime = set_layout(runtime, parallel, seed=3)
            reference, full_bytes = full_load(family, hf_config, hub, parallel)
            from_hf = policy(runtime, family, hf_config, settings, str(hub))
            read = CountingReader.made[-1].bytes_read
            local = sum(p.numel() * 4 for p in from_hf.parameters())  # the files are fp32
            whole = sum(p.numel() * 4 for n, p in from_hf.named_parameters()  # same on every rank
                        if split_dim(canonical_name(n), p) is None and not is_expert_param(n))
            from_mcore = policy(runtime, family, hf_config, settings, str(root / family_name / name))
            stats = torch.tensor([max_diff(from_hf, reference), max_diff(from_mcore, reference),
                                  float(read != local), float(read), float(full_bytes), float(whole)],
                                 dtype=torch.float64)
            maxed = stats.clone()
            torch.distributed.all_reduce(maxed, op=torch.distributed.ReduceOp.MAX)
            summed = stats.clone()
            torch.distributed.all_reduce(summed)
            report[f"{family_name}/{name}"] = {
                "hf_max_abs_diff": maxed[0].item(), "mcore_max_abs_diff": maxed[1].item(),
                "ranks_reading_other_than_their_params": summed[2].item(),
                "max_rank_bytes": maxed[3].item(), "sum_rank_bytes": summed[3].item(),
                "full_bytes": maxed[4].item(), "unsplit_bytes": maxed[5].item()}
    if runtime.rank == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
