"""Vocab-parallel TP=2 (two gloo processes) gives the TP=1 outputs and gradients (tp_worker.py)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 300  # a hung collective fails the test instead of hanging the run


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_tp2_equals_tp1_for_logprobs_and_fused_loss_with_and_without_sequence_parallel():
    world = 2
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0"))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.kernels.tp_worker"], cwd=REPO,
                              env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"TP={world} launch did not finish within {LAUNCH_TIMEOUT_S} s")
    report = "\n".join(outputs)
    assert all(p.returncode == 0 for p in procs), report
