"""Every vLLM call the adapter makes, checked against vLLM 0.33.0's real classes on CPU.

The adapter runs one RL step (build, sleep, wake weights, reload, wake KV cache, generate, sleep)
against a recording `LLM` whose outputs are vLLM's own RequestOutput / CompletionOutput / Logprob
objects; each recorded call is then bound to the real method's `inspect.signature`. `LLM(...)`
keywords that are not LLM's own go to `EngineArgs` through **kwargs: they are bound to it and
EngineArgs is actually built from them, and Literal-typed values are checked against their choices.
vLLM cannot build an engine without a GPU, so what happens inside the calls is not checked here.
"""
import dataclasses
import inspect
import typing

import pytest

from megatron_vlm.rollout import vllm_engine as ve
from megatron_vlm.rollout.protocol import RolloutRequest, SamplingParams
from tests.rollout.vllm_fakes import RecordingLLM

INSTALL = ("vLLM 0.33.0 is not installed; to run the contract test on CPU: "
           "pip install --no-deps vllm==0.33.0, then its pure-Python dependencies "
           "(cbor2, msgspec, pyzmq, blake3, ...) each with --no-deps")
vllm = pytest.importorskip("vllm", reason=INSTALL)
if vllm.__version__ != "0.33.0":
    pytest.skip(f"the contract is with vLLM 0.33.0, found {vllm.__version__}; {INSTALL}",
                allow_module_level=True)

from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.logprobs import Logprob  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402

LAUNCHER_ENV = {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}


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


@pytest.fixture(scope="module")
def step():
    """One RL step of the adapter against the recording LLM; returns (engine, samples)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(vllm, "LLM", RealOutputLLM)  # the adapter does `from vllm import LLM` lazily
    try:
        cfg = ve.VllmEngineConfig(model_dir="/hf/qwen3-vl", tensor_parallel_size=2,
                                  return_routed_experts=True)
        engine = ve.VllmEngine(cfg, environ=dict(LAUNCHER_ENV))
        engine.sleep()
        engine.wake_up(["weights"])
        engine.update_weights([[("model.language_model.norm.weight", __import__("torch").ones(4))]])
        engine.wake_up(["kv_cache"])
        requests = [RolloutRequest("a", [1, 99, 5], images=[object()]), RolloutRequest("b", [1, 6])]
        samples = engine.generate(requests, SamplingParams(n=2, max_new_tokens=4, top_k=5, seed=3,
                                                           stop_token_ids=[2]))
        engine.sleep()
    finally:
        mp.undo()
    return engine, samples


def test_the_step_makes_every_kind_of_call(step):
    engine, _ = step
    assert sorted(set(engine.llm.names())) == sorted(
        ["__init__", "collective_rpc", "generate", "reset_mm_cache", "reset_prefix_cache",
         "sleep", "wake_up"])


def test_the_step_covers_every_llm_call_in_the_adapters_source(step):
    """A call added to the adapter later must be exercised (and so checked) here too."""
    import ast

    tree = ast.parse(inspect.getsource(ve))
    in_source = {node.func.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and ast.unparse(node.func.value) == "self.llm"}
    engine, _ = step
    assert in_source == set(engine.llm.names()) - {"__init__"}
    vllm_imports = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("vllm") for alias in node.names}
    assert vllm_imports == {"LLM", "SamplingParams"}  # both built in this file's tests


def test_llm_constructor_keywords_bind_and_build_engine_args(step):
    engine, _ = step
    (_, args, kwargs), = [c for c in engine.llm.calls if c[0] == "__init__"]
    signature = inspect.signature(vllm.LLM.__init__)
    bound = signature.bind(None, *args, **kwargs)  # raises on a wrong name or positional use
    own = {n for n, p in signature.parameters.items() if p.kind is not p.VAR_KEYWORD}
    forwarded = bound.arguments.get("kwargs", {})
    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(forwarded) - set(fields))
    assert not unknown, f"LLM(**kwargs) forwards to EngineArgs, which has no {unknown}"
    for name, value in kwargs.items():
        annotation = (signature.parameters[name].annotation if name in own else fields[name].type)
        choices = literal_choices(annotation)
        assert choices is None or value in choices, f"{name}={value!r} not in {sorted(map(str, choices))}"
    # What LLM.__init__ does with them: EngineArgs(model=..., <own>..., **kwargs), on CPU.
    engine_args = EngineArgs(**kwargs)
    assert engine_args.distributed_executor_backend == "external_launcher"
    assert engine_args.enable_sleep_mode and engine_args.load_format == "dummy"
    assert engine_args.logprobs_mode == "processed_logprobs"
    assert engine_args.enable_return_routed_experts
    assert (engine_args.tensor_parallel_size, engine_args.data_parallel_size) == (2, 2)


def test_load_format_dummy_is_a_registered_loader():
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    assert "dummy" in _LOAD_FORMAT_TO_MODEL_LOADER


@pytest.mark.parametrize("method", ["wake_up", "sleep", "reset_prefix_cache", "reset_mm_cache",
                                    "collective_rpc", "generate"])
def test_llm_method_calls_bind_to_the_real_signatures(step, method):
    engine, _ = step
    calls = [c for c in engine.llm.calls if c[0] == method]
    signature = inspect.signature(getattr(vllm.LLM, method))
    for _, args, kwargs in calls:
        bound = signature.bind(None, *args, **kwargs)
        for name, value in bound.arguments.items():
            choices = literal_choices(signature.parameters[name].annotation)
            assert choices is None or value in choices, f"{method}({name}={value!r})"


def test_sleep_levels_and_wake_tags_are_vllms():
    from vllm.device_allocator import DEFERRABLE_TAGS

    assert set(ve.TAGS) == set(DEFERRABLE_TAGS)
    doc = inspect.getdoc(vllm.LLM.sleep)
    assert "Level 1" in doc and "Level 2" in doc


def test_collective_rpc_target_is_the_workers_reload_weights(step):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    engine, _ = step
    (_, args, kwargs), = [c for c in engine.llm.calls if c[0] == "collective_rpc"]
    method, rpc_kwargs = args[0], kwargs["kwargs"]
    assert callable(getattr(Worker, method))
    # Worker.reload_weights(*args, **kwargs) forwards to the model runner's
    inspect.signature(getattr(GPUModelRunner, method)).bind(None, **rpc_kwargs)
    assert engine.llm.loaded == ["model.language_model.norm.weight"]


def test_collective_rpc_runs_in_process_with_the_external_launcher():
    """The lazy weight stream is only valid when the RPC is a local call (no pickling)."""
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher, UniProcExecutor

    assert issubclass(ExecutorWithExternalLauncher, UniProcExecutor)
    assert "run_method(self.driver_worker" in inspect.getsource(UniProcExecutor.collective_rpc)
    assert "self.engine_core.collective_rpc" in inspect.getsource(InprocClient.collective_rpc)
    assert "ExecutorWithExternalLauncher" in inspect.getsource(Executor.get_class)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in inspect.getsource(ExecutorWithExternalLauncher)


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


def test_outputs_map_from_real_vllm_objects(step):
    _, samples = step
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
    assert "routed_experts" in inspect.signature(CompletionOutput).parameters


def test_expandable_segments_is_read_from_the_variable_vllm_reads():
    import vllm.config.vllm as vllm_config_module

    assert "PYTORCH_CUDA_ALLOC_CONF" in inspect.getsource(vllm_config_module)
    assert "PYTORCH_CUDA_ALLOC_CONF" in ve.ALLOC_CONF_VARS
