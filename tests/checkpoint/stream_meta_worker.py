"""One rank of the weight-stream launch (2 gloo ranks): iter_hf_buckets at PP=2 against the same
weights streamed at PP=1 (where no tensor crosses stages), counting the object collectives the
stream makes. Writes, per layout, the bucket names, whether every tensor matches the PP=1 stream
bit for bit, and the object-collective count."""
import json
import sys
from collections import Counter

import torch

from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict
from megatron_vlm.checkpoint.streaming import iter_hf_buckets
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime, set_layout
from tests.trainer.policy_fixtures import tiny_policy_weights

OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")
BUCKET_BYTES = 100_000


def count_object_collectives(counts: Counter) -> None:
    for name in OBJECT_COLLECTIVES:
        real = getattr(torch.distributed, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        setattr(torch.distributed, name, counted)


def stream(runtime, family, hf, rules, full, parallel: ParallelConfig, counts: Counter):
    set_layout(runtime, parallel, seed=5)
    model = family.build(hf.config, parallel, "cpu")
    load_full_state_dict(model, full, RankLayout.current(model.config))
    counts.clear()
    return list(iter_hf_buckets(model, rules, BUCKET_BYTES)), sum(counts.values())


def main():
    out_path = sys.argv[1]
    runtime = init_runtime(ParallelConfig(), seed=5)
    hf, family, rules, full = tiny_policy_weights(seed=2)
    counts = Counter()
    count_object_collectives(counts)
    reference, _ = stream(runtime, family, hf, rules, full, ParallelConfig(), counts)
    report = {"tensors": sum(len(b) for b in reference), "buckets": len(reference)}
    for name, parallel in {"pp1": ParallelConfig(), "pp2": ParallelConfig(pp=2),
                           "ep2": ParallelConfig(ep=2, etp=1)}.items():
        buckets, objects = stream(runtime, family, hf, rules, full, parallel, counts)
        same_names = [[n for n, _ in b] for b in buckets] == [[n for n, _ in b] for b in reference]
        same_tensors = same_names and all(
            t.dtype == r.dtype and torch.equal(t, r)
            for b, rb in zip(buckets, reference) for (_, t), (_, r) in zip(b, rb))
        report[name] = {"same_bucket_names": same_names, "same_tensors": same_tensors,
                        "object_collectives": objects}
    flags = torch.tensor([int(report[k][f]) for k in ("pp1", "pp2", "ep2")
                          for f in ("same_bucket_names", "same_tensors")])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)  # true on every rank
    report["all_ranks_agree"] = bool(flags.all())
    if runtime.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
