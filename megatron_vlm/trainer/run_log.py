"""A run's outputs in `train.out_dir`: the metrics log, the curves, and the guard that keeps one
run from silently writing over another's.

    metrics.jsonl         one JSON object per step (and per evaluation), rank 0; appended on resume
    curves.png            held-out accuracy, reward and loss over all stages
    rejection_sft.jsonl   the examples RFT stages kept
    checkpoints/          the run state (checkpoint/run_state.py)
    hf_export/            the final policy in HF format

A fresh run refuses an out_dir holding any of these unless told to `overwrite` (which removes
them first) or to `resume`; a resumed run cuts the append-only files back to what they held when
its checkpoint was written, so no step is logged twice.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron_vlm.trainer.loggers import Progress, build_sinks, scalars, summary_table

METRICS = "metrics.jsonl"
CURVES = "curves.png"
REJECTION = "rejection_sft.jsonl"
CHECKPOINTS = "checkpoints"
EXPORT = "hf_export"
OUTPUTS = (METRICS, CURVES, REJECTION, CHECKPOINTS, EXPORT, "samples", "report.html", "tb", "wandb", "wandb_id")


def existing_outputs(out_dir: Path) -> list[str]:
    return [name for name in OUTPUTS if (out_dir / name).exists()]


def refuse_foreign_outputs(out_dir: Path) -> None:
    found = existing_outputs(out_dir)
    if found:
        raise FileExistsError(f"train.out_dir {out_dir} holds another run's outputs ({', '.join(found)}): "
                              f"pass --resume auto to continue that run, --overwrite to replace it, "
                              f"or choose another train.out_dir")


def remove_outputs(out_dir: Path) -> None:
    """--overwrite: the previous run's outputs go before this run writes anything."""
    for name in existing_outputs(out_dir):
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def truncate_lines(path: Path, keep: int) -> list[dict]:
    """Keep the first `keep` JSON lines of `path` (rewritten atomically); returns them. No file:
    a resume from another out_dir's checkpoint, whose log starts here."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < keep:
        raise ValueError(f"{path} holds {len(rows)} rows but the checkpoint was written after row {keep}: "
                         f"the file was edited or belongs to another run")
    rows = rows[:keep]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


def truncate_bytes(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class MetricsLog:
    """Metrics from rank 0: JSON lines (always), TensorBoard / W&B (`train.loggers`, through
    trainer/loggers.py), and the progress display. `rows`: everything logged by this run so far
    (on resume, the rows kept from before); a row's index is its step on the other loggers."""

    def __init__(self, out_dir: Path, enabled: bool, resume_rows: int | None = None,
                 loggers: list[str] = ("jsonl",), config: dict | None = None, project: str = "megatron_vlm",
                 stream=None):
        self.enabled, self.rows, self.file, self.sinks = enabled, [], None, []
        self.progress = Progress(stream)
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / METRICS
        if resume_rows is not None:
            self.rows = truncate_lines(path, resume_rows)
        self.file = open(path, "a" if resume_rows is not None else "w")
        self.sinks = build_sinks(list(loggers), out_dir, config, project)

    def stage(self, kind: str, index: int, count: int, steps: int, first: int) -> None:
        if self.enabled:
            self.progress.stage(kind, index, count, steps, first)

    def __call__(self, row: dict) -> None:
        if not self.enabled:
            return
        step = len(self.rows)
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        values = scalars(row)
        for sink in self.sinks:
            sink.log(values, step)
        self.progress.row(row)

    def summary(self) -> None:
        """The per-stage table, on the log (end of a run, preemption save)."""
        if self.enabled and self.rows:
            self.progress.close()
            print("run summary\n" + summary_table(self.rows), file=self.progress.stream, flush=True)

    def close(self) -> None:
        self.progress.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self.file:
            self.file.close()
