"""A rank that returns from main without calling shutdown() still destroys its process group before
the interpreter is torn down: gloo's threads outliving it abort the process in finalisation
("terminate called without an active exception", SIGABRT), which failed a finished equivalence
launch in CI (rank 0 exit -6 after the last collective)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import atexit, torch
# registered first, so it runs last: after whatever init_runtime registered
atexit.register(lambda: print("group alive at exit:", torch.distributed.is_initialized(), flush=True))
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.runtime import init_runtime
runtime = init_runtime(ParallelConfig(), seed=1)
t = torch.ones(4)
torch.distributed.all_reduce(t)
print("world", runtime.world_size, "sum", t.tolist(), flush=True)
"""


def test_process_group_is_destroyed_at_exit():
    # a fresh single process: not this pytest process's rendezvous (its store holds MASTER_PORT)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world 1 sum [1.0, 1.0, 1.0, 1.0]" in out.stdout
    assert "group alive at exit: False" in out.stdout, out.stdout
