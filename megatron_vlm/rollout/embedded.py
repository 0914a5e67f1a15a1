"""The embedded rollout engine (CPU default): transformers' own model class for the family.

Built from the exported HF config with no weights of its own: every weight arrives through
`update_weights` as HF-named full tensors from the trainer's stream (checkpoint/streaming.py), so
each RL step exercises the same conversion path the vLLM engine uses, and `generate` refuses to run
before every parameter has been loaded once. Generation is transformers' `generate` with a KV cache,
batched over all requests (left padding), `n` samples per request, seeded.

Log-probabilities are those of the sampling distribution before top-k / top-p truncation:
log_softmax(logits / temperature) at each sampled token (what the trainer recomputes for the
importance ratio and the sync check). A stop token ends a response and is part of it (the policy
must learn to stop), with its log-probability.

Routed experts (MoE routing replay, `return_routed_experts=True`): forward hooks on every text MoE
router (transformers' `*.mlp.gate`, which returns (logits, weights, indices)) record the indices the
engine's own forward used: prefill over the left-padded prompts (vision placeholder positions
included) and each decode step. A sample gets `metadata["routed_experts"]`, int16
[prompt_len + response_len - 1, moe_layers, top_k] (the final response token is sampled but never
run), the same contract as vLLM's `completion.routed_experts`. transformers' rule (softmax, top-k of
the probabilities, renormalised) selects the experts megatron's does (top-k of the logits, softmax
over those k; models/language.py): softmax is monotonic, so only exact float ties could differ.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from megatron_vlm.rollout.protocol import Bucket, RolloutRequest, RolloutSample, SamplingParams


@dataclass
class Prepared:
    """One request after the family's processor: the model's inputs for a single prompt."""
    input_ids: torch.Tensor                 # [s] expanded (one token per merged image patch)
    mm_token_type_ids: torch.Tensor         # [s] 0 text, 1 image
    pixel_values: torch.Tensor | None = None  # [patches, C * T * P * P]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]


Preparer = Callable[[RolloutRequest], Prepared]


class EmbeddedEngine:
    def __init__(self, hf_config, prepare: Preparer, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, pad_token_id: int = 0,
                 return_routed_experts: bool = False):
        from megatron_vlm.models import family_for

        family = family_for(hf_config)
        with torch.device("meta"):
            model = family.hf_model_class(hf_config)
        self.model = model.to_empty(device=device).to(dtype).eval()
        self.dtype = dtype
        self._restore_buffers(family, hf_config)
        self.prepare, self.device, self.pad_token_id = prepare, torch.device(device), pad_token_id
        self.params = dict(self.model.named_parameters())
        self._tied = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
        self.loaded: set[str] = set()
        self.awake = {"weights": True, "kv_cache": True}
        self.return_routed_experts = return_routed_experts
        self.routers = moe_routers(self.model)
        if return_routed_experts and not self.routers:
            raise ValueError("return_routed_experts: the engine's model has no MoE routers (a dense family)")

    def _restore_buffers(self, family, hf_config) -> None:
        """Non-persistent buffers (rotary inverse frequencies) are not in any checkpoint: build
        them once on the CPU and copy them in."""
        reference = family.hf_model_class(hf_config)
        buffers = dict(reference.named_buffers())
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])

    # -- lifecycle --------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        self.awake = {"weights": False, "kv_cache": False}

    def wake_up(self, tags: list[str] | None = None) -> None:
        for tag in tags or ["weights", "kv_cache"]:
            if tag not in self.awake:
                raise ValueError(f"unknown wake_up tag {tag!r}; known: {sorted(self.awake)}")
            self.awake[tag] = True

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[Bucket]) -> int:
        """Copy HF-named tensors into the model; returns the number of tensors loaded."""
        count = 0
        for bucket in buckets:
            for name, tensor in bucket:
                if name not in self.params:
                    raise KeyError(f"engine has no parameter {name!r} (bucket from another model?)")
                param = self.params[name]
                if tensor.shape != param.shape and tensor.dim() == 3 and \
                        tensor.shape == (param.shape[0], param.shape[2], param.shape[1]):
                    tensor = tensor.transpose(1, 2)  # Hub layout of fused experts
                if tensor.shape != param.shape:
                    raise ValueError(f"{name}: engine expects {list(param.shape)}, got {list(tensor.shape)}")
                param.copy_(tensor)
                self.loaded.add(name)
                count += 1
        return count

    def missing_weights(self) -> list[str]:
        return sorted(set(self.params) - self.loaded - self._tied)

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[RolloutRequest], sampling: SamplingParams) -> list[RolloutSample]:
        if not all(self.awake.values()):
            raise RuntimeError(f"generate() with the engine partly asleep {self.awake}: wake both "
                               f"weights and kv_cache first")
        missing = self.missing_weights()
        if missing:
            raise RuntimeError(f"generate() before every weight was synced: {len(missing)} missing, "
                               f"e.g. {missing[:3]}")
        if not requests:
            return []
        start = time.perf_counter()
        prepared = [self.prepare(r) for r in requests]
        batch = self._collate(prepared)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        greedy = sampling.temperature == 0
        with self._record_routes(batch["input_ids"].shape[0] * sampling.n) as routes:
            out = self.model.generate(
                **batch, do_sample=not greedy, temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy or not sampling.top_k else sampling.top_k,
                max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
                eos_token_id=list(sampling.stop_token_ids) or None, pad_token_id=self.pad_token_id,
                output_logits=True, return_dict_in_generate=True)
        seconds = (time.perf_counter() - start) / (len(requests) * sampling.n)
        new = out.sequences[:, batch["input_ids"].shape[1]:]            # [B*n, steps]
        logits = torch.stack(out.logits, dim=1).float()                  # [B*n, steps, V]
        logits = logits / (sampling.temperature or 1.0)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])[..., 0]
        routed = self._routes(routes, batch["input_ids"].shape[1], new.shape[1])
        samples = [self._sample(requests[i // sampling.n], prepared[i // sampling.n], i % sampling.n,
                                new[i], logprobs[i], sampling, seconds) for i in range(new.shape[0])]
        if routed is not None:
            prompt_width = batch["input_ids"].shape[1]
            for row, sample in enumerate(samples):
                tokens = len(sample.prompt_ids) + len(sample.response_ids) - 1
                start = prompt_width - len(sample.prompt_ids)  # left padding
                sample.metadata = {**sample.metadata, "routed_experts": routed[row, start:start + tokens].clone()}
        return samples

    @contextmanager
    def _record_routes(self, rows: int):
        """Collect, per MoE layer, the expert indices each forward of `generate` used, as
        [rows, tokens of that forward, top_k] chunks (prefill, then one token per decode step)."""
        chunks: list[list[torch.Tensor]] = [[] for _ in self.routers]
        if not self.return_routed_experts:
            yield None
            return

        def keep(layer):
            def hook(_gate, _inputs, output):
                indices = output[2]                                   # [rows * tokens, top_k]
                chunks[layer].append(indices.reshape(rows, -1, indices.shape[-1]).to("cpu", torch.int16))
            return hook

        hooks = [gate.register_forward_hook(keep(i)) for i, gate in enumerate(self.routers)]
        try:
            yield chunks
        finally:
            for hook in hooks:
                hook.remove()

    @staticmethod
    def _routes(chunks, prompt_width: int, steps: int) -> torch.Tensor | None:
        """[rows, prompt_width + steps - 1, moe_layers, top_k]: every fed position, layers stacked."""
        if chunks is None:
            return None
        routes = torch.stack([torch.cat(layer, dim=1) for layer in chunks], dim=2)
        if routes.shape[1] != prompt_width + steps - 1:
            raise RuntimeError(f"routed experts: recorded {routes.shape[1]} positions, expected the prompt's "
                               f"{prompt_width} + {steps - 1} decode steps (generate ran another schedule?)")
        return routes

    def _sample(self, request, prepared, index, tokens, logprobs, sampling, seconds) -> RolloutSample:
        stops = set(sampling.stop_token_ids)
        length, reason = len(tokens), "length"
        for position, token in enumerate(tokens.tolist()):
            if token in stops:
                length, reason = position + 1, "stop"
                break
        return RolloutSample(
            request_id=request.request_id, index=index, prompt_ids=prepared.input_ids.tolist(),
            response_ids=tokens[:length].tolist(), logprobs=logprobs[:length].tolist(),
            finish_reason=reason, seconds=seconds, metadata=request.metadata)

    def _collate(self, prepared: list[Prepared]) -> dict[str, torch.Tensor]:
        """Left-pad prompts to one length; images concatenated in request order."""
        longest = max(len(p.input_ids) for p in prepared)
        ids = torch.full((len(prepared), longest), self.pad_token_id, dtype=torch.long)
        types = torch.zeros((len(prepared), longest), dtype=torch.long)
        mask = torch.zeros((len(prepared), longest), dtype=torch.long)
        for row, p in enumerate(prepared):
            n = len(p.input_ids)
            ids[row, longest - n:], types[row, longest - n:] = p.input_ids, p.mm_token_type_ids
            mask[row, longest - n:] = 1
        batch = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                 "mm_token_type_ids": types.to(self.device)}
        pixels = [p.pixel_values for p in prepared if p.pixel_values is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
            batch["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prepared
                                                 if p.image_grid_thw is not None]).to(self.device)
        return batch


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text MoE routers of a transformers model, in layer order: the `mlp.gate` modules that
    choose `top_k` experts (Qwen3-VL-MoE's `Qwen3VLMoeTextTopKRouter`)."""
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]
