"""When a VLM run saves its state, what it saves beside the model, and where a resume starts.

    ckpt = RunCheckpointer(ctx, stages)
    position = ckpt.restore(path)                   # None for a fresh run
    ...after each step: ckpt.maybe_save(index, step, rows)

checkpoint/run_state.py writes the model, optimizer, scheduler, reference policy and every RNG
(each rank its own) to a checkpoint directory; this module adds the run's own state: which stage
and step were done, the data draws and reward statistics (`RunContext.state_dict`), the stage's
state (MPO's reward shift), how many metric rows and rejection-SFT bytes existed, and the
resolved config (a resume reports where the current one differs). A checkpoint is written every `train.checkpoint.every` steps of a stage and at the end of
each stage; the tags count steps over all stages, so the newest is the furthest.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_vlm.checkpoint.run_state import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from megatron_vlm.config import to_dict
from megatron_vlm.trainer.run_log import CHECKPOINTS, REJECTION, file_size, truncate_bytes

@dataclass(frozen=True)
class Position:
    """Where a resumed run continues: stage `stage` after its step `step` (step == that stage's
    steps: the stage is done and the next one is entered)."""
    stage: int
    step: int
    metrics_rows: int


class RunCheckpointer:
    def __init__(self, ctx, stages: list):
        self.ctx, self.stages = ctx, stages
        self.cfg = ctx.cfg.train.checkpoint
        self.root = ctx.out_dir / CHECKPOINTS
        self.save_seconds = 0.0  # the last save's duration: the time budget reserves it
        self.saved: tuple[int, int] | None = None

    def due(self, index: int, step: int) -> bool:
        every, steps = self.cfg.every, self.stages[index].cfg.steps
        return step == steps or (every is not None and step % every == 0)

    def maybe_save(self, index: int, step: int, metrics_rows: int) -> None:
        if self.due(index, step):
            self.save(index, step, metrics_rows)

    def save(self, index: int, step: int, metrics_rows: int) -> Path:
        if self.saved == (index, step):
            return self.root / self._tag(index, step)
        start = time.perf_counter()
        ctx, actor = self.ctx, self.ctx.actor
        run_state = {"stage": index, "step": step, "stage_kind": self.stages[index].cfg.kind,
                     "metrics_rows": metrics_rows, "rejection_bytes": file_size(ctx.out_dir / REJECTION),
                     "context": ctx.state_dict(), "stage_state": self.stages[index].state_dict()}
        path = save_checkpoint(self.root, self._tag(index, step), model_chunks=[actor.ddp],
                               optimizer=actor.optimizer, scheduler=actor.scheduler,
                               extra_models=self._extra_models(), rank_state={}, run_state=run_state,
                               config=to_dict(ctx.cfg), keep=self.cfg.keep)
        self.save_seconds, self.saved = time.perf_counter() - start, (index, step)
        return path

    def find(self, resume: str) -> Path | None:
        """Rank 0 verifies (reading every file once), every rank gets its answer."""
        found = [None]
        if self.ctx.runtime.rank == 0:
            try:
                found[0] = ("ok", find_checkpoint(self.root, resume))
            except (CheckpointError, OSError) as error:
                found[0] = ("error", str(error))
        torch.distributed.broadcast_object_list(found, src=0)
        if found[0][0] == "error":
            raise CheckpointError(found[0][1])
        return found[0][1]

    def restore(self, path: Path) -> Position:
        """Load `path` into the model, optimizer and run state; where to continue."""
        ctx, actor = self.ctx, self.ctx.actor
        extra = self._extra_models()  # (the reference policy may be missing: see below)
        run_state, rank_state = load_checkpoint(path, model_chunks=[actor.ddp], optimizer=actor.optimizer,
                                                scheduler=actor.scheduler, extra_models=extra,
                                                optional_models=frozenset(extra))
        if rank_state is None and ctx.runtime.rank == 0:
            print(f"resume: {path} was saved on another layout; weights, optimizer, schedule and run state "
                  f"carry over, each rank's RNG does not (this run's seeds are used)", flush=True)
        self._report_config_changes(path)
        index, step = run_state["stage"], run_state["step"]
        if index >= len(self.stages) or self.stages[index].cfg.kind != run_state["stage_kind"]:
            raise ValueError(f"checkpoint {path} was written in stage {index} ({run_state['stage_kind']}), "
                             f"which this config's stages do not have at that place")
        if run_state["models_not_saved"]:  # a KL term added since the checkpoint's run
            if step < self.stages[index].cfg.steps:
                raise CheckpointError(f"{path} was saved inside stage {index} ({run_state['stage_kind']}) without "
                                      f"the {run_state['models_not_saved'][0]!r} model this config's loss needs "
                                      f"(a KL term added since?): resume from a stage's end, or without it")
            if ctx.runtime.rank == 0:  # at a stage's end: the next stage takes pi_ref from the policy
                print(f"resume: {path} has no {run_state['models_not_saved'][0]!r} model; stage {index + 1} "
                      f"takes it from the policy as it enters", flush=True)
        ctx.load_state_dict(run_state["context"])
        if step < self.stages[index].cfg.steps:  # mid-stage: the stage continues with its state
            self.stages[index].load_state_dict(run_state["stage_state"])
        if ctx.runtime.rank == 0:
            truncate_bytes(ctx.out_dir / REJECTION, run_state["rejection_bytes"])
        self.saved = (index, step)
        return Position(index, step, run_state["metrics_rows"])

    def _report_config_changes(self, path: Path) -> None:
        """Rank 0 names every config value that differs from the checkpoint's (a new layout is
        expected to; a changed recipe is the user's call, but never a silent one)."""
        saved_file = path / "config.json"
        if self.ctx.runtime.rank != 0 or not saved_file.is_file():
            return
        changes = config_changes(json.loads(saved_file.read_text()), to_dict(self.ctx.cfg))
        for key, (before, now) in list(changes.items())[:20]:
            print(f"resume: {key} was {before!r} in the checkpoint, is {now!r} now", flush=True)

    def _tag(self, index: int, step: int) -> str:
        done = sum(stage.cfg.steps for stage in self.stages[:index]) + step
        return f"step{done:07d}-{self.stages[index].cfg.kind}{index}"

    def _extra_models(self) -> dict:
        reference = self.ctx.actor.reference
        return {"reference": [reference.model]} if reference is not None else {}


def config_changes(saved, current, prefix: str = "") -> dict:
    """{dotted key: (saved value, current value)} for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = {}
        for key in sorted(set(saved) | set(current), key=str):
            out.update(config_changes(saved.get(key), current.get(key), f"{prefix}{key}."))
        return out
    return {} if saved == current else {prefix.rstrip("."): (saved, current)}
