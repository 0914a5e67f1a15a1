"""Two gloo ranks, the real vLLM engine colocated with the megatron trainer (its process group up).

`tp2`: one engine replica over both ranks (`external_launcher`, TP=2) inside the trainer's group
(trainer DP=2: the demo's 107-token vocabulary does not split over a trainer TP of 2; vLLM pads
its own): vLLM slices the streamed full HF tensors for its TP; both ranks must see the same greedy
outputs (compared with TP=1 by the test).
`tp1`: trainer DP=2 and one independent TP=1 engine per rank: the prompts are dealt by replica
(`generate_share`), every sample comes back once, in request order, on both ranks; with one
prompt for two replicas, the idle replica skips `generate` and nothing waits for it.
Writes rank 0's figures as JSON for test_vllm_real.py.
"""
import json
import sys
from pathlib import Path

import torch

from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.rollout.vllm_engine import VllmEngine
from megatron_vlm.rollout.weight_sync import sync_weights
from tests.rollout.vllm_fixtures import GREEDY, SAMPLED, Demo, diff_stats, outputs


def gathered(obj) -> list:
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, obj)
    return everyone


def tp2(demo) -> dict:
    engine = VllmEngine(demo.engine_config(tensor_parallel_size=2), "cpu")
    sync_weights(demo.model, demo.rules, engine, 256 << 10)
    greedy = engine.generate(demo.requests, demo.sampling(**GREEDY))
    sampled = engine.generate(demo.requests, demo.sampling(**SAMPLED))
    ranks = gathered(outputs(greedy))
    report = dict(replicas=engine.replicas, ranks_equal=all(r == ranks[0] for r in ranks),
                  greedy=ranks[0], fp32=diff_stats([s.logprobs for s in sampled],
                                                   demo.trainer_logprobs(sampled)))
    engine.close()
    return report


def tp1(demo) -> dict:
    from megatron_vlm.trainer.grpo import engine_replica, generate_share

    engine = VllmEngine(demo.engine_config(), "cpu")
    sync_weights(demo.model, demo.rules, engine, 256 << 10)
    actor = type("Actor", (), {})()  # generate_share reads nothing of the actor but its engine's
    sampling = demo.sampling(**SAMPLED)
    replicas, replica = engine_replica(engine)
    mine = [r.request_id for r in demo.requests[replica::replicas]]
    samples = generate_share(actor, engine, demo.requests, sampling)
    keys = [(s.request_id, s.index) for s in samples]
    lone = generate_share(actor, engine, demo.requests[:1], sampling)  # replica 1 has nothing to do
    everyone = gathered(dict(replica=replica, mine=mine, keys=keys,
                             lone=[(s.request_id, s.index) for s in lone]))
    report = dict(replicas=replicas, ranks=everyone, requests=[r.request_id for r in demo.requests],
                  n=sampling.n, fp32=diff_stats([s.logprobs for s in samples],
                                                demo.trainer_logprobs(samples)))
    engine.close()
    return report


def main(out_path: str, mode: str) -> None:
    demo = Demo(Path(out_path).parent, ParallelConfig())
    report = tp2(demo) if mode == "tp2" else tp1(demo)
    if demo.runtime.rank == 0:
        Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
