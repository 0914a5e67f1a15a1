"""`megatron-vlm` command line: train, plan, convert, report, bench.

  megatron-vlm train --config configs/lm_demo.yaml [--resume auto|PATH] [--overwrite] [key.sub=value ...]
  megatron-vlm plan  --config configs/qwen3_vl_30b_a3b.yaml [--nproc N]
  megatron-vlm convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N --etp N --nproc N]
  megatron-vlm convert mcore-to-hf --ckpt DIR --out DIR [--max-shard-gb G]
  megatron-vlm report RUN_DIR [--out FILE]          |  megatron-vlm report --compare RUN_A RUN_B ... --out PNG
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
    from megatron_vlm.parallel.preemption import EXIT_PREEMPTED

    cfg = _config(args)
    world = cfg.runtime.nproc if "RANK" not in os.environ else int(os.environ["WORLD_SIZE"])
    cfg.check(world)  # layout errors before any process starts
    if cfg.runtime.nproc > 1 and "RANK" not in os.environ:
        from megatron_vlm.parallel.launch import launch_local

        argv = ["-m", "megatron_vlm.cli", "train", "--config", args.config]
        argv += (["--resume", args.resume] if args.resume else []) + (["--overwrite"] if args.overwrite else [])
        result = launch_local(argv + list(args.overrides), cfg.runtime.nproc, timeout=args.timeout,
                              stream_rank0=True)
        if result.exit_code == EXIT_PREEMPTED:  # every rank saved and stopped: a SLURM script requeues
            print(f"megatron-vlm: ranks stopped for a preemption (exit {EXIT_PREEMPTED})", file=sys.stderr)
        elif not result.ok:
            print(result.summary(), file=sys.stderr)
        return result.exit_code  # the ranks' own code when they agree, else 1
    if not cfg.is_vlm:
        from megatron_vlm.trainer.lm import run

        if args.resume:
            raise ValueError("--resume: the LM demo keeps no checkpoints (VLM runs do); rerun it with --overwrite")
        run(cfg, overwrite=args.overwrite)
        return 0
    from megatron_vlm.trainer.vlm_run import Preempted, run

    try:
        run(cfg, resume=args.resume, overwrite=args.overwrite)
    except Preempted as stop:
        print(f"megatron-vlm: {stop}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


def cmd_plan(args) -> int:
    from megatron_vlm.parallel.plan import format_plan

    cfg = _config(args)
    world = args.nproc or cfg.world_size()
    print(format_plan(cfg, world))
    return 0


def cmd_convert(args) -> int:
    from megatron_vlm.checkpoint import convert

    if args.direction == "mcore-to-hf":
        if not args.ckpt:
            raise ValueError("mcore-to-hf needs --ckpt DIR")
        out = convert.mcore_to_hf(args.ckpt, args.out, int(args.max_shard_gb * (1 << 30)))
        print(f"wrote {out}")
        return 0
    if not args.hf:
        raise ValueError("hf-to-mcore needs --hf DIR")
    from megatron_vlm.parallel.config import ParallelConfig

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # a worker of --nproc
        if not os.environ.get(convert.PARTIAL_ENV):
            raise ValueError(f"hf-to-mcore under a launcher (RANK is set) is a worker of --nproc and "
                             f"needs {convert.PARTIAL_ENV}; run it once, with --nproc N, instead")
        part = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        convert.hf_to_mcore(args.hf, args.out, parallel, part=part, finalize=False,
                            partial=os.environ[convert.PARTIAL_ENV])
        return 0
    if args.nproc > 1:
        import shutil

        from megatron_vlm.parallel.launch import launch_local

        argv = ["-m", "megatron_vlm.cli", "convert", "hf-to-mcore", "--hf", args.hf, "--out",
                args.out, "--tp", str(args.tp), "--pp", str(args.pp), "--ep", str(args.ep)]
        if args.etp is not None:
            argv += ["--etp", str(args.etp)]
        partial = convert.new_partial_dir(args.out)  # one for all the workers
        try:
            result = launch_local(argv, args.nproc, timeout=args.timeout,
                                  env={convert.PARTIAL_ENV: str(partial)})
            if not result.ok:
                print(result.summary(), file=sys.stderr)
                return 1
            out = convert.finalize_mcore(args.hf, args.out, parallel, partial)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already when finalize renamed it
    else:
        out = convert.hf_to_mcore(args.hf, args.out, parallel)
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from megatron_vlm.report import compare_runs, render_report

    if args.compare:
        out = Path(args.out or "compare.png")
        compare_runs([Path(r) for r in args.runs], out)
    else:
        if len(args.runs) != 1:
            raise ValueError("report takes one RUN_DIR (or --compare RUN_A RUN_B ...)")
        out = render_report(Path(args.runs[0]), Path(args.out) if args.out else None)
    print(f"wrote {out}")
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
    train.add_argument("--resume", default=None, metavar="auto|PATH",
                       help="continue from the newest valid checkpoint in train.out_dir (auto: a "
                            "fresh start when there is none) or from the checkpoint PATH")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of another run in train.out_dir")
    train.add_argument("overrides", nargs="*", help="key.sub=value")
    train.set_defaults(func=cmd_train)
    plan = sub.add_parser("plan", help="print the parallel plan and per-rank memory")
    plan.add_argument("--config", required=True)
    plan.add_argument("--nproc", type=int, default=None, help="world size (default: from config)")
    plan.add_argument("overrides", nargs="*", help="key.sub=value")
    plan.set_defaults(func=cmd_plan)
    conv = sub.add_parser("convert", help="HF <-> megatron checkpoints (streaming)")
    conv.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    conv.add_argument("--hf", help="HF checkpoint directory (hf-to-mcore)")
    conv.add_argument("--ckpt", help="megatron_vlm checkpoint directory (mcore-to-hf)")
    conv.add_argument("--out", required=True, help="output directory (must not exist)")
    for flag in ("tp", "pp", "ep"):
        conv.add_argument(f"--{flag}", type=int, default=1)
    conv.add_argument("--etp", type=int, default=None, help="expert TP (default: --tp)")
    conv.add_argument("--nproc", type=int, default=1, help="processes for hf-to-mcore")
    conv.add_argument("--max-shard-gb", type=float, default=2.0, help="HF shard size bound")
    conv.add_argument("--timeout", type=float, default=7200)
    conv.set_defaults(func=cmd_convert)
    report = sub.add_parser("report", help="a run's HTML page (curves, sampled rollouts), or runs compared")
    report.add_argument("runs", nargs="+", help="RUN_DIR (a train.out_dir); with --compare, several")
    report.add_argument("--compare", action="store_true", help="one figure of several runs' curves")
    report.add_argument("--out", default=None, help="RUN_DIR/report.html, or compare.png with --compare")
    report.set_defaults(func=cmd_report)
    bench = sub.add_parser("bench", help="microbenchmarks")
    bench.add_argument("what", help="kernels")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"megatron-vlm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
