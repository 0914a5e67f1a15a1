"""Start N local ranks of a Python command with torchrun's environment (CPU runs and tests).

On a cluster, torchrun / srun start the ranks (launch/); here a parent process starts them itself:
each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT shared by
the launch, and OMP_NUM_THREADS=1 (two cores: more threads per rank only oversubscribe). The launch
is bounded by a timeout, so a hung collective fails instead of hanging, and a rank that dies takes
the others down.

No rank outlives the launcher:
- SIGTERM, SIGINT and SIGUSR1 sent to the launcher are forwarded to every rank (to its process
  group, so its own children get them too); the ranks then have `grace_s` seconds to save and exit
  (parallel/preemption.py) before the launcher SIGKILLs what is left. The handlers are installed
  only for the launch, only from the main thread, and the previous ones restored after.
- Each rank runs in its own session (a terminal's Ctrl-C reaches the launcher alone, which forwards
  it once) and, on Linux, with PR_SET_PDEATHSIG=SIGKILL: a launcher that is SIGKILLed, or dies any
  other way, takes its ranks with it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from megatron_vlm.parallel.preemption import EXIT_PREEMPTED
from megatron_vlm.parallel.runtime import free_port

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class LaunchResult:
    returncodes: list[int]
    logs: list[str]
    timed_out: bool
    signalled: int | None = None  # the first signal the launcher forwarded to the ranks

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    @property
    def exit_code(self) -> int:
        """The ranks' exit code when they all agree on one in 0..255 (EXIT_PREEMPTED after a
        preemption, for a SLURM script to requeue), else 1."""
        codes = set(self.returncodes)
        if self.timed_out or len(codes) != 1 or not 0 <= min(codes) <= 255:
            return 1
        return codes.pop()

    def summary(self, tail: int = 4000) -> str:
        signalled = signal.Signals(self.signalled).name if self.signalled else None
        parts = [f"timed_out={self.timed_out} signalled={signalled} returncodes={self.returncodes}"]
        for rank, log in enumerate(self.logs):
            parts.append(f"--- rank {rank} ---\n{log[-tail:]}")
        return "\n".join(parts)


def launch_local(args: list[str], nproc: int, timeout: float = 600, env: dict | None = None,
                 stream_rank0: bool = False, threads_per_rank: int = 1,
                 grace_s: float = 120) -> LaunchResult:
    """Run `python *args` as `nproc` ranks; wait at most `timeout` seconds for all of them, and at
    most `grace_s` seconds after forwarding a signal."""
    port = free_port()
    procs, files = [], []
    forwarder = _SignalForwarder(procs)
    try:
        for rank in range(nproc):
            rank_env = dict(os.environ, **(env or {}))
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads_per_rank))
            out = None if (stream_rank0 and rank == 0) else tempfile.TemporaryFile("w+")
            files.append(out)
            procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None,
                                          start_new_session=True, preexec_fn=_die_with_parent()))
        forwarder.install()
        timed_out = _wait(procs, time.monotonic() + timeout, forwarder, grace_s)
    finally:
        forwarder.restore()
        for p in procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
        codes = [p.wait() for p in procs]
    return LaunchResult(codes, _read_logs(files), timed_out, forwarder.first)


def _wait(procs, deadline: float, forwarder: "_SignalForwarder", grace_s: float) -> bool:
    """Poll until every rank has exited; True when the timeout (not the grace period) ran out."""
    while any(p.poll() is None for p in procs):
        if forwarder.first is not None:
            if time.monotonic() > forwarder.since + grace_s:
                return False
        elif time.monotonic() > deadline:
            return True
        # A rank that failed takes the others down; one that stopped for a preemption does not
        # (the others may still be writing their part of the checkpoint).
        elif any(p.poll() not in (None, 0, EXIT_PREEMPTED) for p in procs):
            time.sleep(2)  # let the others report their own error, then stop them
            return False
        time.sleep(0.05)
    return False


class _SignalForwarder:
    """While installed, a forwarded signal goes to every rank that is still running."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.first: int | None = None
        self.since = 0.0
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works only there; the ranks still die with the launcher
        for sig in FORWARDED_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._forward)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _forward(self, signum, frame) -> None:
        if self.first is None:
            self.first, self.since = signum, time.monotonic()
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p, signum)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the rank's process group (it leads its own session), the rank alone if that fails."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _die_with_parent():
    """A preexec_fn that makes the rank receive SIGKILL when the launcher dies (Linux), or None.

    The libc function is looked up here, before the fork; the child only calls it, then checks it
    was not orphaned already (the launcher dying between fork and prctl)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    launcher = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != launcher:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _read_logs(files) -> list[str]:
    logs = []
    for f in files:
        if f is None:
            logs.append("")
            continue
        f.seek(0)
        logs.append(f.read())
        f.close()
    return logs
