"""Stop a run cleanly before the cluster stops it: on a signal, or when the time budget runs out.

Each rank installs a `Preemption` in its main thread. SIGTERM (SLURM's preemption and time-limit
signal, the local launcher's forward) and SIGUSR1 (`#SBATCH --signal=B:USR1@300`, forwarded by
launch/slurm_train.sbatch) only set a flag: a handler that saved a checkpoint would run at an
arbitrary bytecode, inside a collective or an optimizer step. SIGINT is left alone: Ctrl-C still
raises KeyboardInterrupt and stops at once, without a save; send SIGTERM or SIGUSR1 for a save.

The trainer asks `should_stop(step_seconds, save_seconds)` at each step boundary. That is one
all-reduce (MAX) of [signalled, deadline_near] over the world group, so every rank gets the same
answer at the same step even when the signal reached only some of them (srun, torchrun and the
local launcher forward it to every rank, but not at the same instant). A rank that stops then saves
and exits with EXIT_PREEMPTED.

The time budget is `save_by`, an absolute unix time by which the last checkpoint must be written:
`train.save_by` (`parse_save_by`), or, when that is unset, the SLURM job's end time
(`slurm_job_end_time`). The deadline is near when another step plus a save, times a safety factor,
would end after it.
"""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

# EX_TEMPFAIL from <sysexits.h>, "temporary failure, try again": the run stopped at a step
# boundary after a save, and resuming it is the right thing to do. The sbatch scripts turn it into
# `scontrol requeue`; the job then restarts with `--resume auto`.
EXIT_PREEMPTED = 75
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# torchrun reports every failed worker as exit 1, so a 75 never reaches srun: a rank that stops for
# a preemption also writes its reason to this file, when the variable is set (the sbatch does).
PREEMPTED_FILE_ENV = "MEGATRON_VLM_PREEMPTED_FILE"


class Preemption:
    """The preemption flag and time budget of one rank; use as a context manager, or
    install() / restore().

    `device` is the world group's collective device (NCCL takes device tensors only; gloo takes
    CPU ones); `safety` scales the estimated time of one more step and a save."""

    def __init__(self, device, save_by: float | None = None, safety: float = 1.5,
                 clock: Callable[[], float] = time.time, group=None):
        if safety < 1:
            raise ValueError(f"preemption safety factor must be >= 1, got {safety}")
        self.device, self.save_by, self.safety, self.clock, self.group = device, save_by, safety, clock, group
        self.received: int | None = None  # the first handled signal
        self._previous: dict[int, object] = {}

    def install(self) -> "Preemption":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Preemption.install() must run in the main thread (signal handlers)")
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.restore()

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def signalled(self) -> bool:
        return self.received is not None

    def deadline_near(self, step_seconds: float, save_seconds: float) -> bool:
        """True when one more step and a save, times `safety`, would end after `save_by`."""
        if self.save_by is None:
            return False
        return self.clock() + self.safety * (step_seconds + save_seconds) > self.save_by

    def should_stop(self, step_seconds: float, save_seconds: float) -> str | None:
        """"signal", "time budget" or None, the same on every rank (a collective: call it at the
        same step boundary on every rank of the world group)."""
        import torch
        import torch.distributed as dist

        flags = torch.tensor([self.signalled, self.deadline_near(step_seconds, save_seconds)],
                             dtype=torch.int32, device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        signalled, near = flags.tolist()
        if signalled:
            return "signal"
        return "time budget" if near else None


def record_preemption(reason: str, env: Mapping[str, str] = os.environ) -> None:
    """Leave `reason` in the file PREEMPTED_FILE_ENV names, if any (see above)."""
    path = env.get(PREEMPTED_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(reason + "\n")


def parse_save_by(value, start_time: float) -> float | None:
    """`train.save_by` as an absolute unix time: seconds from `start_time` (a number, or a string
    of one), or an ISO-8601 time (`2026-12-02T14:00:00Z`; without an offset, local time, as SLURM
    prints it). None or "" means unset."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):  # a YAML `yes` is not a duration
        raise ValueError(f"train.save_by must be seconds from the start or an ISO-8601 time, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = None
    if seconds is not None:
        if not 0 < seconds < float("inf"):
            raise ValueError(f"train.save_by must be a positive number of seconds, got {value!r}")
        return start_time + seconds
    try:
        return datetime.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        raise ValueError(f"train.save_by must be seconds from the start or an ISO-8601 time "
                         f"(e.g. 2026-12-02T14:00:00Z), got {value!r}") from None


def slurm_job_end_time(env: Mapping[str, str] = os.environ, run=subprocess.run) -> float | None:
    """The SLURM job's end time as a unix time, or None outside SLURM or when it cannot be read.

    SLURM_JOB_END_TIME (epoch seconds, in the environment since SLURM 20.11) first; it is set at
    job start, so a later `scontrol update TimeLimit=` is missed. Otherwise ask the controller:
    `squeue -o %e`, then `scontrol show job`'s EndTime=. Never raises: an unknown end time costs
    the run its time budget, not the run."""
    end = env.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and int(end) > 0:
        return float(end)
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    for command, field in ((["squeue", "-h", "-j", job, "-o", "%e"], None),
                           (["scontrol", "show", "job", job], "EndTime=")):
        try:
            out = run(command, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        end_time = _slurm_time(out, field)
        if end_time is not None:
            return end_time
    return None


def _slurm_time(output: str, field: str | None) -> float | None:
    """A SLURM timestamp (2026-12-02T14:00:00, local time) from a command's output, or None for
    Unknown / N/A / anything unparsable."""
    if field is not None:
        words = [w for w in output.split() if w.startswith(field)]
        output = words[0][len(field):] if words else ""
    try:
        return datetime.datetime.fromisoformat(output.strip()).timestamp()
    except ValueError:
        return None


def resolve_save_by(value, start_time: float, env: Mapping[str, str] = os.environ,
                    run=subprocess.run) -> float | None:
    """`train.save_by` when set, else the SLURM job's end time, else None (no time budget)."""
    save_by = parse_save_by(value, start_time)
    return save_by if save_by is not None else slurm_job_end_time(env, run)
