"""`megatron-vlm` command line: train, plan, bench.

  megatron-vlm train --config configs/lm_demo.yaml [key.sub=value ...]
  megatron-vlm plan  --config configs/qwen3_vl_30b_a3b.yaml [--nproc N]
  megatron-vlm bench kernels [...]

`train` with runtime.nproc > 1 and no launcher around it (no RANK in the environment) starts the
ranks itself on this machine; under torchrun or srun each rank runs the job directly.
"""
from __future__ import annotations

import argparse
import os
import sys


def _config(args):
    from megatron_vlm.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    cfg = _config(args)
    world = cfg.runtime.nproc if "RANK" not in os.environ else int(os.environ["WORLD_SIZE"])
    cfg.check(world)  # layout errors before any process starts
    if cfg.runtime.nproc > 1 and "RANK" not in os.environ:
        from megatron_vlm.parallel.launch import launch_local

        argv = ["-m", "megatron_vlm.cli", "train", "--config", args.config, *args.overrides]
        result = launch_local(argv, cfg.runtime.nproc, timeout=args.timeout, stream_rank0=True)
        if not result.ok:
            print(result.summary(), file=sys.stderr)
            return 1
        return 0
    from megatron_vlm.trainer import lm

    lm.run(cfg)
    return 0


def cmd_plan(args) -> int:
    from megatron_vlm.parallel.plan import format_plan

    cfg = _config(args)
    world = args.nproc or cfg.world_size()
    print(format_plan(cfg, world))
    return 0


def cmd_bench(args) -> int:
    if args.what != "kernels":
        raise SystemExit(f"unknown benchmark {args.what!r}; known: kernels")
    from kernels.bench.__main__ import main as bench_main

    return bench_main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-vlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job from a config")
    train.add_argument("--config", required=True)
    train.add_argument("--timeout", type=float, default=3600, help="seconds, for local ranks")
    train.add_argument("overrides", nargs="*", help="key.sub=value")
    train.set_defaults(func=cmd_train)
    plan = sub.add_parser("plan", help="print the parallel plan and per-rank memory")
    plan.add_argument("--config", required=True)
    plan.add_argument("--nproc", type=int, default=None, help="world size (default: from config)")
    plan.add_argument("overrides", nargs="*", help="key.sub=value")
    plan.set_defaults(func=cmd_plan)
    bench = sub.add_parser("bench", help="microbenchmarks")
    bench.add_argument("what", help="kernels")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megatron-vlm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
