"""A recording stand-in for `vllm.LLM`, shared by the CPU unit tests and the contract test.

It records every call the adapter makes (method, positional args, keyword args) and models the one
behaviour the adapter depends on: generate returns, per prompt, `n` completions of a fixed token
pattern with log-probs. `make_output` builds the output objects; the contract test passes vLLM's
real RequestOutput / CompletionOutput / Logprob classes, the unit tests plain namespaces.
"""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace


def namespace_output(request_id, prompt_ids, completions):
    return SimpleNamespace(request_id=request_id, prompt_token_ids=prompt_ids, outputs=[
        SimpleNamespace(index=i, token_ids=ids, routed_experts=None, finish_reason=reason,
                        logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, lps)])
        for i, (ids, lps, reason) in enumerate(completions)])


def expand(prompt: dict, image_tokens: int = 3) -> list[int]:
    """What vLLM's processor does to a placeholder (id 99 here): repeat it per image patch."""
    out = []
    for token in prompt["prompt_token_ids"]:
        out.extend([token] * (image_tokens if token == 99 and "multi_modal_data" in prompt else 1))
    return out


class RecordingLLM:
    make_output = staticmethod(namespace_output)
    instances: list["RecordingLLM"] = []

    def __init__(self, *args, **kwargs):
        self.calls = [("__init__", args, kwargs)]
        RecordingLLM.instances.append(self)
        self.llm_engine = SimpleNamespace(
            reset_encoder_cache=lambda *a, **k: self._record("llm_engine.reset_encoder_cache", a, k),
            engine_core=SimpleNamespace(  # vLLM's InprocClient (VLLM_ENABLE_V1_MULTIPROCESSING=0)
                shutdown=lambda *a, **k: self._record("llm_engine.engine_core.shutdown", a, k)))

    def _record(self, name, args, kwargs):
        self.calls.append((name, args, kwargs))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def wake_up(self, *args, **kwargs):
        self._record("wake_up", args, kwargs)
        return True

    def sleep(self, *args, **kwargs):
        self._record("sleep", args, kwargs)

    def reset_prefix_cache(self, *args, **kwargs):
        self._record("reset_prefix_cache", args, kwargs)
        return True

    def reset_mm_cache(self, *args, **kwargs):
        self._record("reset_mm_cache", args, kwargs)

    def collective_rpc(self, method, *args, **kwargs):
        self._record("collective_rpc", (method, *args), kwargs)
        # The worker method runs in this process: consume the stream like vLLM's loader does,
        # keeping the names it saw. A callable (the CPU expert repack) is only recorded.
        stream = (kwargs.get("kwargs") or {}).get("weights_iterator")
        if stream is not None:
            self.loaded = [name for name, _ in stream]
        return [None]

    def generate(self, prompts, *args, **kwargs):
        self._record("generate", (prompts, *args), kwargs)
        params = kwargs.get("sampling_params", args[0] if args else None)
        outputs = []
        for i, prompt in enumerate(prompts):
            completions = []
            for j in range(params.n):
                ids = [10 + j, 11, 2] if j % 2 == 0 else [10 + j] * params.max_tokens
                reason = "stop" if j % 2 == 0 else "length"
                completions.append((ids, [-0.25 * (k + 1) for k in range(len(ids))], reason))
            outputs.append(self.make_output(str(i), expand(prompt), completions))
        return outputs


def install_fake_vllm(monkeypatch):
    """A `vllm` module with the recording LLM and a SamplingParams that keeps its kwargs, for
    machines without vLLM."""
    module = types.ModuleType("vllm")
    module.LLM = RecordingLLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    RecordingLLM.instances.clear()
    return module
