"""A VLM post-training run: a list of stages (SFT, GRPO, RFT, DPO, MPO) over one model, ending in
an HF export; it survives being stopped.

    megatron-vlm train --config configs/digits_demo.yaml [--resume auto | PATH] [--overwrite]

The shared pieces (model, optimizer, engine, scorer, data) are built once (`trainer/context.py`);
each stage kind is a registered object (`trainer/stages/`). Held-out accuracy (greedy decoding
through the engine, scored by the task's verifier) is measured before training, every
`eval.every` steps (a stage's own `eval_every` where set) and at the end of each stage. The run
state is saved every `train.checkpoint.every` steps and at the end of each stage
(`trainer/checkpointing.py`); a resumed run continues after the checkpoint's step with the same
metrics an uninterrupted run logs. SIGTERM / SIGUSR1, or the time budget (`train.save_by`, else
the SLURM job's end), stop the run at the next step boundary, on every rank at once, with a
checkpoint and `EXIT_PREEMPTED`.
Outputs in `train.out_dir`: see `trainer/run_log.py`.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from megatron_vlm.checkpoint.convert import export_model
from megatron_vlm.config import to_dict
from megatron_vlm.parallel.preemption import Preemption, record_preemption, resolve_save_by
from megatron_vlm.parallel.runtime import shutdown
from megatron_vlm.trainer.checkpointing import RunCheckpointer
from megatron_vlm.trainer.context import build_context
from megatron_vlm.trainer.megatron_step import collective_device
from megatron_vlm.report import plot_run
from megatron_vlm.trainer.run_log import (CHECKPOINTS, CURVES, EXPORT, MetricsLog, refuse_foreign_outputs,
                                          remove_outputs)
from megatron_vlm.trainer.stages import build_stages


class Preempted(Exception):
    """The run stopped at a step boundary (signal or time budget) after saving a checkpoint."""


def run(cfg, resume: str | None = None, overwrite: bool = False, keep_runtime: bool = False) -> list[dict]:
    """The run's stages; returns the logged rows (rank 0). `resume`: "auto" (the newest valid
    checkpoint in train.out_dir, or a fresh start when there is none) or a checkpoint path.
    `keep_runtime` leaves the process groups up for another run in the same processes (tests)."""
    cfg.rl.check(cfg.rollout)
    out = Path(cfg.train.out_dir)
    if not overwrite and (resume is None or not (out / CHECKPOINTS).is_dir()):
        refuse_foreign_outputs(out)  # before anything is built (nothing to resume from: the same)
    # installed first: a signal during the build is not lost (it stops the run after its first step)
    preemption = Preemption(None, resolve_save_by(cfg.train.save_by, time.time())).install()
    ctx, log = None, None
    try:
        ctx = build_context(cfg)
        preemption.device = collective_device()
        stages = build_stages(ctx)
        ckpt = RunCheckpointer(ctx, stages)
        position = _start(ctx, ckpt, resume, overwrite)
        log = MetricsLog(out, ctx.runtime.rank == 0, position and position.metrics_rows, cfg.train.loggers,
                         to_dict(cfg), cfg.train.wandb_project)
        if position is None:
            log(dict(stage="init", step=0, **ctx.evaluate()))
        for index, stage in enumerate(stages):
            first = _first_step(position, index, stage.cfg.steps)
            if first is None:
                continue  # done before the checkpoint
            if first == 1:
                stage.begin()  # (a stage resumed inside is not entered again)
            log.stage(stage.cfg.kind, index, len(stages), stage.cfg.steps, first)
            for step in range(first, stage.cfg.steps + 1):
                start = time.perf_counter()
                metrics = stage.step(step)
                metrics.update(stage=stage.cfg.kind, step=step, step_seconds=time.perf_counter() - start)
                if step % (stage.cfg.eval_every or cfg.eval.every) == 0 or step == stage.cfg.steps:
                    metrics.update(ctx.evaluate())
                log(metrics)
                ckpt.maybe_save(index, step, len(log.rows))
                reason = preemption.should_stop(time.perf_counter() - start, ckpt.save_seconds)
                if reason:
                    path = ckpt.save(index, step, len(log.rows))
                    record_preemption(reason)
                    raise Preempted(f"stopped by {reason} after {stage.cfg.kind} step {step}: "
                                    f"saved {path}; continue with --resume auto")
        if cfg.vlm.export:
            export(ctx)
        return log.rows
    finally:
        preemption.restore()
        if ctx is not None:
            ctx.close()
        if log is not None:
            log.summary()
            log.close()
            if ctx.runtime.rank == 0 and log.rows:
                plot_run(log.rows, out / CURVES)
        if not keep_runtime:
            shutdown()


def _first_step(position, index: int, steps: int) -> int | None:
    """The step stage `index` starts at: 1 on a fresh run and after the checkpoint's stage, the
    one after the checkpoint's step inside it, None for a stage done before the checkpoint."""
    if position is None or index > position.stage:
        return 1
    if index < position.stage or position.step == steps:
        return None
    return position.step + 1


def _start(ctx, ckpt: RunCheckpointer, resume: str | None, overwrite: bool):
    """The position to continue from (None: a fresh run). A resume that finds no checkpoint
    starts fresh only into an out_dir without another run's outputs."""
    path = ckpt.find(resume) if resume is not None else None
    if path is None and resume is not None and not overwrite:
        refuse_foreign_outputs(ctx.out_dir)
    if path is None and overwrite and ctx.runtime.rank == 0:
        remove_outputs(ctx.out_dir)
    torch.distributed.barrier()  # every rank sees the same out_dir from here on
    if path is None:
        return None
    position = ckpt.restore(path)
    if ctx.runtime.rank == 0:
        print(f"resumed from {path}: stage {position.stage} ({ctx.cfg.stages[position.stage].kind}) "
              f"after step {position.step}", flush=True)
    return position


def export(ctx) -> None:
    """The policy in HF format, written under a temporary name and renamed over the previous
    export only once complete: a run stopped mid-export never leaves a half export or none."""
    out = ctx.out_dir / EXPORT
    nonce = [uuid.uuid4().hex[:8]]
    torch.distributed.broadcast_object_list(nonce, src=0)
    tmp = ctx.out_dir / f"{EXPORT}.tmp-{nonce[0]}"
    export_model(ctx.actor.model, ctx.actor.rules, ctx.hf_config, str(tmp),
                 side_files_from=str(ctx.assets / "model"))
    torch.distributed.barrier()
    if ctx.runtime.rank == 0:
        old = ctx.out_dir / f"{EXPORT}.old-{nonce[0]}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()

