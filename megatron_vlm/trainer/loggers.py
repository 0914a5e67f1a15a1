"""Where a run's metrics go besides `metrics.jsonl`, how its progress shows, and its summary.

    train.loggers: [jsonl, tensorboard, wandb]    # jsonl is always on

- `tensorboard`: event files under `train.out_dir/tb` (torch.utils.tensorboard; `pip install
  tensorboard`). `wandb`: a W&B run in `train.out_dir` (`pip install wandb`); W&B's own variables
  choose the mode, e.g. `WANDB_MODE=offline` writes the run locally without a network, to
  `wandb sync` later. Both get every numeric metric of a row under one grouped name
  (`metric_name`: `reward/`, `time/`, `sync/`, `eval/`, `train/`), at the run's global step (the
  steps of all stages counted in order). `metrics.jsonl` keeps the flat names of the row, the
  record the scripts read.
- Progress: on a terminal, a tqdm bar per stage with its ETA and the few numbers of that stage
  kind; elsewhere (CI, SLURM logs) one plain line per step, so logs stay readable.
- `summary_table(rows)`: per stage, steps, wall time, time per phase, eval accuracy at its start
  and end (and the stage's last evaluation by kind, strict beside it), tokens/s, reward failures
  and timeouts; printed at the end of a run and on a preemption save. Evaluation lines show the
  strict and per-kind accuracy when the run logs them (`trainer/evaluation.py`).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from megatron_vlm.config import LOGGERS
from megatron_vlm.report import kind_names, stage_spans

GROUPS = {"time_": "time/", "sync_": "sync/", "eval_": "eval/", "reward_": "reward/"}
# the numbers a progress line shows, per stage kind (those present in the row)
PROGRESS_KEYS = {
    "sft": ("loss", "train_tokens_per_s"),
    "grpo": ("reward", "mixed_group_share", "sync_logprob_max_abs", "loss"),
    "rft": ("reward", "rejection_kept", "loss"),  # rejection_* from rl/rejection.py
    "dpo": ("loss", "reward_accuracy"),
    "mpo": ("loss", "reward_accuracy"),
}
LINE_KEYS = ("stage", "step", "loss", "reward", "mixed_group_share", "eval_accuracy",
             "sync_logprob_max_abs", "step_seconds")


def metric_name(key: str) -> str:
    """The grouped name of a row's key: `time_update` -> `time/update`, `step_seconds` ->
    `time/step`, `sync_logprob_max_abs` -> `sync/logprob_max_abs`, `eval_accuracy` ->
    `eval/accuracy`, `reward` -> `reward/mean`, names with a `/` as they are, the rest `train/`."""
    if "/" in key:
        return key
    if key == "reward":
        return "reward/mean"
    if key.endswith("_seconds"):
        return "time/" + key[: -len("_seconds")]
    for prefix, group in GROUPS.items():
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return "train/" + key


def scalars(row: dict) -> dict[str, float]:
    """The row's finite numbers under their grouped names (bools and labels left out)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            if math.isfinite(value):
                out[metric_name(key)] = float(value)
    return out


class TensorBoardSink:
    def __init__(self, out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError as exc:
            raise ValueError(f"train.loggers has tensorboard, which is not installed "
                             f"(pip install tensorboard): {exc}") from None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tb"))

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, out_dir: Path, config: dict | None, project: str):
        try:
            import wandb
        except ImportError as exc:
            raise ValueError(f"train.loggers has wandb, which is not installed (pip install wandb): "
                             f"{exc}") from None
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=str(out_dir), config=config, name=out_dir.name,
                              resume="allow", id=_wandb_id(out_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(out_dir: Path) -> str:
    """One W&B run per out_dir, so a resumed run continues its curves (kept in out_dir/wandb_id)."""
    path = out_dir / "wandb_id"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def build_sinks(names: list[str], out_dir: Path, config: dict | None, project: str) -> list:
    unknown = sorted(set(names) - set(LOGGERS))
    if unknown:
        raise ValueError(f"train.loggers: unknown {unknown}; known: {list(LOGGERS)}")
    sinks = []
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(out_dir))
    if "wandb" in names:
        sinks.append(WandbSink(out_dir, config, project))
    return sinks


class Progress:
    """A tqdm bar per stage on a terminal; plain lines otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.bar = None
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def stage(self, kind: str, index: int, count: int, steps: int, first: int) -> None:
        self.close()
        if self.tty:
            from tqdm import tqdm  # a dependency of transformers and datasets

            self.bar = tqdm(total=steps, initial=first - 1, desc=f"[{index + 1}/{count}] {kind}",
                            file=self.stream, dynamic_ncols=True)
        else:
            print(f"stage {index + 1}/{count}: {kind}, steps {first}..{steps}", file=self.stream, flush=True)

    def row(self, row: dict) -> None:
        if self.bar is not None and row.get("stage") != "init":
            keys = PROGRESS_KEYS.get(row.get("stage"), ("loss",))
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in keys + ("step_seconds",) if k in row}, refresh=False)
            self.bar.update(1)
            if "eval_accuracy" in row:
                self.bar.write(f"{row['stage']} step {row['step']}: eval accuracy {row['eval_accuracy']:.4g}"
                               f"{by_kind(row)}", file=self.stream)
            return
        print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                       for k in LINE_KEYS if k in row) + by_kind(row), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def by_kind(row: dict) -> str:
    """' (strict 0.41; sum 0.62, max 0.05, difference 0.55)': an evaluation row's strict and
    per-kind accuracy, '' for a row without them."""
    if "eval_strict_accuracy" not in row:
        return ""
    kinds = ", ".join(f"{kind} {row[f'eval/accuracy/{kind}']:.3g}" for kind in kind_names([row]))
    return f" (strict {row['eval_strict_accuracy']:.3g}" + (f"; {kinds})" if kinds else ")")


def summary_table(rows: list[dict]) -> str:
    """Per stage (in the order the run met them, `report.stage_spans`): steps, wall time, time per
    phase, eval accuracy at the start (the evaluation before it) and the end, trained tokens/s,
    reward failures / timeouts."""
    lines = [f"{'stage':<6} {'steps':>5} {'wall s':>8} {'eval start':>10} {'eval end':>9} {'train tok/s':>11} "
             f"{'rew fail':>8} {'timeouts':>8}  time per phase (s)"]
    for kind, first, last in stage_spans(rows):
        span = rows[first:last + 1]
        before = [r["eval_accuracy"] for r in rows[:first] if "eval_accuracy" in r]
        evals = [r["eval_accuracy"] for r in span if "eval_accuracy" in r]
        seconds = sum(r.get("step_seconds", 0.0) for r in span)
        tokens = sum(r.get("train_tokens", r.get("tokens", 0)) for r in span)  # trained tokens (GRPO / SFT names)
        phases: dict[str, float] = {}
        for row in span:
            for key, value in row.items():
                if key.startswith("time_") and isinstance(value, (int, float)):
                    phases[key[5:]] = phases.get(key[5:], 0.0) + value
        rate = tokens / seconds if seconds and tokens else float("nan")
        failures = sum(int(r.get("reward/failures", 0)) for r in span)
        timeouts = sum(int(r.get("reward/timeouts", 0)) for r in span)
        listed = ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
        lines.append(f"{kind:<6} {len(span):>5} {seconds:>8.1f} {_fmt(before[-1] if before else None):>10} "
                     f"{_fmt(evals[-1] if evals else None):>9} {rate:>11.0f} {failures:>8} {timeouts:>8}  {listed or '-'}")
        last_eval = next((r for r in reversed(span) if "eval_accuracy" in r), None)
        if last_eval is not None and by_kind(last_eval):
            lines.append(f"{'':<6} eval end{by_kind(last_eval)}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
