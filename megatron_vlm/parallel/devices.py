"""Where a tensor entering a collective must live: the group's device (NCCL takes CUDA tensors
only; gloo takes host tensors and would hide a device mistake on CPU). Below trainer/ so that
checkpoint/ and rollout/ can use it; megatron_step re-exports both names."""
from __future__ import annotations

import torch


def device_for_backend(backend: str) -> torch.device:
    """The device a collective of `backend` takes its tensors on: the current CUDA device when the
    backend is NCCL (alone or as a group's CUDA half, e.g. "cpu:gloo,cuda:nccl"), else the host."""
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """Where a tensor entering a collective over `group` (None: the world) must live."""
    return device_for_backend(torch.distributed.get_backend(group))
