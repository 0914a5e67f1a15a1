"""A rank for tests/parallel/test_launch_signals.py: writes DIR/pid.<rank>, then waits.

Usage: signal_worker.py DIR MODE. MODE "preempt": a Preemption flag; on SIGTERM / SIGUSR1 it writes
DIR/signal.<rank> (the signal's name) and exits EXIT_PREEMPTED. MODE "stubborn": ignores SIGTERM.
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch

from megatron_vlm.parallel.preemption import EXIT_PREEMPTED, Preemption


def main(out: Path, mode: str) -> int:
    rank = os.environ["RANK"]
    with Preemption(torch.device("cpu")) as preemption:
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        (out / f"pid.{rank}").write_text(str(os.getpid()))
        for _ in range(6000):  # at most 5 minutes
            if preemption.signalled:
                (out / f"signal.{rank}").write_text(signal.Signals(preemption.received).name)
                return EXIT_PREEMPTED
            time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
