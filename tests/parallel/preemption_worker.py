"""One gloo rank of tests/parallel/test_preemption.py: only rank 1 is signalled, then only rank 0's
clock is near the deadline; every rank must get the same answer. Usage: preemption_worker.py OUT.json
"""
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from megatron_vlm.parallel.preemption import Preemption


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    answers = {}
    with Preemption(torch.device("cpu")) as preemption:
        answers["quiet"] = preemption.should_stop(step_seconds=1, save_seconds=1)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        answers["rank 1 signalled"] = preemption.should_stop(step_seconds=1, save_seconds=1)
    now = 1000.0 if rank == 0 else 0.0  # rank 0's step + save would end after save_by
    budget = Preemption(torch.device("cpu"), save_by=1002.0, clock=lambda: now)
    answers["rank 0 near the deadline"] = budget.should_stop(step_seconds=1, save_seconds=1)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, answers)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"per_rank": gathered}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
