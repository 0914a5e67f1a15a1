"""Start N local ranks of a Python command with torchrun's environment (CPU runs and tests).

On a cluster, torchrun / srun start the ranks (launch/); here a parent process starts them itself:
each rank gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT shared by
the launch, and OMP_NUM_THREADS=1 (two cores: more threads per rank only oversubscribe). The launch
is bounded by a timeout, so a hung collective fails instead of hanging, and a rank that dies takes
the others down.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from megatron_vlm.parallel.runtime import free_port


@dataclass
class LaunchResult:
    returncodes: list[int]
    logs: list[str]
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    def summary(self, tail: int = 4000) -> str:
        parts = [f"timed_out={self.timed_out} returncodes={self.returncodes}"]
        for rank, log in enumerate(self.logs):
            parts.append(f"--- rank {rank} ---\n{log[-tail:]}")
        return "\n".join(parts)


def launch_local(args: list[str], nproc: int, timeout: float = 600, env: dict | None = None,
                 stream_rank0: bool = False, threads_per_rank: int = 1) -> LaunchResult:
    """Run `python *args` as `nproc` ranks; wait at most `timeout` seconds for all of them."""
    port = free_port()
    procs, files = [], []
    for rank in range(nproc):
        rank_env = dict(os.environ, **(env or {}))
        rank_env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads_per_rank))
        out = None if (stream_rank0 and rank == 0) else tempfile.TemporaryFile("w+")
        files.append(out)
        procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
    deadline = time.monotonic() + timeout
    timed_out = False
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            timed_out = True
            break
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(2)  # let the others report their own error, then stop them
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    codes = [p.wait() for p in procs]
    logs = []
    for f in files:
        if f is None:
            logs.append("")
            continue
        f.seek(0)
        logs.append(f.read())
        f.close()
    return LaunchResult(codes, logs, timed_out)
