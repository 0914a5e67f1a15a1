"""The frozen reference policy: KL(pi || pi_ref) in the online losses, the reference of DPO / MPO.

    ref = ReferencePolicy.build(family, hf_config, parallel, device_type, params_dtype)
    ref.reset_from(policy)                  # at the start of a stage: pi_ref = the policy entering it
    ref_logprobs = ref.score(batch, images, patches, temperature, micro_batch_size)   # [B, S]

The reference is a second megatron model with the policy's layout, so each rank copies its own
shards (no communication, no gather) and scores with the same code as the old log-probs. It has no
gradients, no DDP wrapper and no optimizer state: its cost is one copy of the model parameters in
the policy's dtype (`runtime.params_dtype`; `reset_from` refuses a reference of another dtype).
Right after `reset_from` it gives bit-identical log-probs to the policy, which is what the tests
check (KL = 0 at the first step).
"""
from __future__ import annotations

import torch

from megatron_vlm.trainer.rl_step import score_rows


class ReferencePolicy:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        for param in self.model.parameters():
            param.requires_grad_(False)

    @classmethod
    def build(cls, family, hf_config, parallel, device_type: str,
              params_dtype: torch.dtype = torch.float32, backend=None) -> "ReferencePolicy":
        return cls(family.build(hf_config, parallel, device_type, params_dtype, backend=backend,
                                calculate_per_token_loss=True))

    @torch.no_grad()
    def reset_from(self, policy: torch.nn.Module) -> None:
        """Copy the policy's local shards (same layout, so names and shapes match one to one)."""
        mine = dict(self.model.named_parameters())
        theirs = dict(policy.named_parameters())
        if mine.keys() != theirs.keys():
            missing = sorted(set(theirs) ^ set(mine))[:5]
            raise ValueError(f"reference and policy differ in parameters (e.g. {missing}): "
                             f"they must be built with the same family and layout")
        for name, param in mine.items():
            if param.dtype != theirs[name].dtype:  # a silent cast would score pi_ref != pi at reset
                raise ValueError(f"reference {name} is {param.dtype}, the policy's is "
                                 f"{theirs[name].dtype}: build it with the policy's params_dtype")
            param.copy_(theirs[name])
        buffers = dict(policy.named_buffers())  # e.g. router expert biases that training moves
        for name, buffer in self.model.named_buffers():
            if name in buffers and buffers[name].shape == buffer.shape:
                buffer.copy_(buffers[name])

    def score(self, batch, images_per_row, patches, temperature: float,
              micro_batch_size: int) -> torch.Tensor:
        return score_rows(self.model, batch, images_per_row, patches, temperature, micro_batch_size)
