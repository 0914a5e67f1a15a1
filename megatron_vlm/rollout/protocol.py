"""The rollout engine protocol: what the trainer asks of any engine (embedded CPU, vLLM on GPU).

Requests carry token ids as the chat template produced them, with ONE image placeholder token per
image (the family's processor expands it to the image's grid), plus the images themselves; each
engine runs the processor it needs. Every returned sample has the expanded prompt ids it was
conditioned on, the response ids, the engine's log-probability of each response token (at the
sampling temperature), why it finished, and how long it took.

Lifecycle per RL step (colocated on the same device as the trainer):
    engine.wake_up(["weights"]); engine.update_weights(buckets); engine.wake_up(["kv_cache"])
    samples = engine.generate(requests, sampling)
    engine.sleep()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch

Bucket = list[tuple[str, torch.Tensor]]  # HF-named full tensors, one size-bounded group


@dataclass(kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 disables
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1                      # samples per request (a GRPO group)
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")


@dataclass
class RolloutRequest:
    request_id: str
    prompt_ids: list[int]                          # one placeholder token per image
    images: list[Any] = field(default_factory=list)  # PIL images, in placeholder order
    metadata: dict = field(default_factory=dict)   # task, reference answer, ... (passed through)


@dataclass
class RolloutSample:
    request_id: str
    index: int                      # 0..n-1 within the request's group
    prompt_ids: list[int]           # expanded: what the model was conditioned on
    response_ids: list[int]
    logprobs: list[float]           # engine's log p(token) per response token
    finish_reason: str              # "stop" | "length"
    seconds: float
    metadata: dict = field(default_factory=dict)
    response_mask: list[int] | None = None  # 0 on response tokens the policy did not sample (e.g.
                                            # a forced answer's inserted delimiter); None: all 1

    def sampled_logprobs(self) -> list[float]:
        """The engine's log-probs of the tokens the policy sampled (the loss-mask positions)."""
        if self.response_mask is None:
            return self.logprobs
        return [lp for lp, keep in zip(self.logprobs, self.response_mask) if keep]


class RolloutEngine(Protocol):
    dtype: Any  # what it computes in (torch.dtype or vLLM's name): the sync check's precision

    def generate(self, requests: list[RolloutRequest], sampling: SamplingParams) -> list[RolloutSample]:
        ...

    def sleep(self, level: int = 1) -> None:
        ...

    def wake_up(self, tags: list[str] | None = None) -> None:
        ...

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        ...
