"""Bring up torch.distributed and megatron's parallel_state with one call, on GPU or CPU.

The same code runs on a GPU cluster (CUDA + NCCL) and on this CPU machine (gloo): the only
difference is `cpu_compat.apply()`, called here and nowhere else, when the device is CPU.
Ranks come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), from srun's (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID), or default to a single process on a free local port.
"""
from __future__ import annotations

import atexit
import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

from megatron_vlm.parallel.config import ParallelConfig


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    parallel: ParallelConfig

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks_from_env(env=os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, then SLURM, else a single process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def pick_device(local_rank: int, device: str | None = None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"runtime.device must be 'cuda' or 'cpu', got {device!r}")
    return torch.device("cpu")


def init_runtime(parallel: ParallelConfig, seed: int = 1234, device: str | None = None,
                 timeout_minutes: int = 10, cpu_patches: set[str] | None = None) -> Runtime:
    """Initialise torch.distributed, megatron parallel_state and every RNG megatron uses.

    `cpu_patches` names the CPU compatibility patches to apply (default: all); the tests leave one
    out to show the megatron site it covers failing.
    """
    from megatron_vlm.parallel.optional import check_apex

    check_apex()
    rank, world_size, local_rank = ranks_from_env()
    parallel.data_parallel_size(world_size)  # layout errors before any process group exists
    dev = pick_device(local_rank, device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cpu":
        from megatron_vlm.parallel import cpu_compat

        cpu_compat.apply(cpu_patches)
    else:
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise RuntimeError("MASTER_PORT is not set for a multi-process run")
            os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        # A process that exits with its process group alive can die in interpreter finalisation
        # (gloo's worker threads still own tensors: "terminate called without an active
        # exception", SIGABRT, pytorch#190489), turning a finished rank into a failed one. The
        # group we made is destroyed while the interpreter is whole; after shutdown() it is a no-op.
        atexit.register(shutdown)
    runtime = Runtime(rank, world_size, local_rank, dev, backend, parallel)
    set_layout(runtime, parallel, seed)
    return runtime


def set_layout(runtime: Runtime, parallel: ParallelConfig, seed: int = 1234) -> Runtime:
    """(Re)build megatron's process groups for `parallel` on the existing world, and reseed."""
    from megatron.core import parallel_state, tensor_parallel

    parallel.data_parallel_size(runtime.world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.expert_tp,
        create_gloo_process_groups=True,  # the optimizer asks for the gloo DP groups
    )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return Runtime(runtime.rank, runtime.world_size, runtime.local_rank, runtime.device,
                   runtime.backend, parallel)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
