"""`runtime.params_dtype: bfloat16` reaches the VLM run (vlm_bf16_worker.py, 2 gloo ranks, EP=2):
bf16 parameters in the policy and the reference, fp32 main params and Adam state in megatron's
mixed-precision optimizer, finite losses, and SFT and GRPO steps that move the weights."""
import os

import pytest

from tests.utils import run_worker

WORKER = os.path.join(os.path.dirname(__file__), "vlm_bf16_worker.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from megatron_vlm.data.digits import DigitsConfig, build_demo_assets

    root = tmp_path_factory.mktemp("bf16")
    build_demo_assets(root / "assets", 0, DigitsConfig(seed=0, num_sft=16, num_rl=16, num_eval=8,
                                                       num_pref=4, num_text=4))
    return run_worker(WORKER, root, args=(str(root / "assets"),), timeout=500)


def is_cpu_norm(name: str) -> bool:
    return name.endswith("layernorm.weight") and not name.startswith("vision.")


@pytest.mark.dist
def test_policy_and_reference_are_bf16(report):
    assert report["config"] == {"params_dtype": "torch.bfloat16", "bf16": True}
    assert [n for n in report["not_bf16"] if not is_cpu_norm(n)] == []
    assert report["reference_not_bf16"] == report["not_bf16"]  # built in the policy's dtype


@pytest.mark.dist
def test_vision_tower_follows_the_dtype(report):
    assert report["vision_params"] == ["bfloat16"]


@pytest.mark.dist
def test_cpu_norms_follow_the_dtype(report):
    assert report["not_bf16"] == []


@pytest.mark.dist
def test_optimizer_keeps_fp32_master_weights(report):
    opt = report["optimizer"]
    assert set(opt["optimizers"]) <= {"Float16OptimizerWithFloat16Params", "DistributedOptimizer"}
    assert opt["main_params"] == ["float32"] and opt["adam_state"] == ["float32"]
    assert opt["main_param_count"] > 0


@pytest.mark.dist
def test_sft_and_grpo_steps_are_finite_and_train(report):
    assert report["finite"]
    assert all(m["grad_norm"] > 0 for m in report["sft"])
    assert report["sft_moved"]["language"] > 0 and report["sft_moved"]["vision"] > 0
    assert report["grpo"]["train_tokens"] > 0 and report["grpo"]["kl_loss"] >= 0
    assert report["grpo_moved"]["language"] > 0
