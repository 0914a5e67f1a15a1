"""The GRPO recipe and its SLURM wrapper, checked on CPU (neither has run on a GPU cluster).

The recipe: every section RunConfig knows loads through config.py's own loader, the trainer layout
plans for 4 x 8 GPUs, the `rl:` sections build the dataclasses they are meant for, and the
numbers that must agree across sections do. The wrapper: valid bash, the srun / torchrun command
it renders in a fake SLURM allocation, and the environment it hands to slurm_train.sbatch.
"""
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_vlm.config import from_dict, load_config, RunConfig
from megatron_vlm.parallel.plan import format_plan
from megatron_vlm.rl.overlong import OverlongPenaltyConfig
from megatron_vlm.rl.sampling import DynamicSamplingConfig
from megatron_vlm.rollout.vllm_engine import VllmEngineConfig, engine_data_parallel, llm_kwargs
from tests.launch.test_scripts import fake_slurm_env

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm_grpo.sbatch"
RECIPE = ROOT / "configs" / "qwen3_vl_30b_a3b_grpo.yaml"
BASE = ROOT / "configs" / "qwen3_vl_30b_a3b.yaml"
RL_KEYS = {"engine", "vllm", "routing_replay", "dynamic_sampling", "overlong"}


@pytest.fixture(scope="module")
def recipe():
    data = yaml.safe_load(RECIPE.read_text())
    rl = data.pop("rl")
    return from_dict(RunConfig, data), rl, data


def test_recipe_without_rl_loads_and_plans_the_trainer(recipe):
    cfg, _, _ = recipe
    assert cfg.world_size() == 32 and cfg.is_vlm
    plan = format_plan(cfg, 32)
    assert "TP=2 x PP=2 x CP=1 x DP=8 = 32" in plan and "EP=8" in plan


def test_whole_recipe_loads_plans_and_the_stage_checks_it():
    cfg = load_config(RECIPE)
    assert cfg.rl.engine == "vllm" and cfg.rl.vllm.tensor_parallel_size == 2
    assert cfg.rl.dynamic_sampling.batch_groups == 128 and cfg.rl.overlong.buffer_len == 1024
    assert "TP=2 x PP=2 x CP=1 x DP=8 = 32" in format_plan(cfg, 32)
    cfg.rl.check(cfg.rollout)  # engine, dynamic sampling and over-long shaping are applied
    cfg.rl.routing_replay = True  # the trainer replays what vLLM returns, once it is asked to
    with pytest.raises(ValueError, match="rl.routing_replay .* needs rl.vllm.return_routed_experts=true"):
        cfg.rl.check(cfg.rollout)
    cfg.rl.vllm.return_routed_experts = True
    cfg.rl.check(cfg.rollout)
    cfg.rl.routing_replay = cfg.rl.vllm.return_routed_experts = False
    cfg.rl.overlong.max_response_len = 4096
    with pytest.raises(ValueError, match="must equal rollout.max_new_tokens"):
        cfg.rl.check(cfg.rollout)


def test_recipe_shares_the_base_recipes_model_and_layout(recipe):
    _, _, data = recipe
    base = yaml.safe_load(BASE.read_text())
    assert "model" not in data and "model" not in base  # the model is the HF config's
    assert data["vlm"]["model_config"] == base["vlm"]["model_config"]
    for section in ("parallel", "runtime"):
        assert data[section] == base[section], f"{section} drifted from {BASE.name}"


def test_rl_sections_build_their_config_classes(recipe):
    cfg, rl, _ = recipe
    assert set(rl) == RL_KEYS and rl["engine"] == "vllm"
    engine = VllmEngineConfig(model_dir=f"{cfg.vlm.assets}/model",
                              return_routed_experts=rl["routing_replay"], **rl["vllm"])
    kwargs = llm_kwargs(engine, "cuda")
    assert kwargs["tensor_parallel_size"] == 2 and "data_parallel_size" not in kwargs  # 16 replicas,
    assert kwargs["distributed_executor_backend"] == "external_launcher"  # each independent
    assert kwargs["enable_return_routed_experts"] is False  # the recipe leaves routing replay off
    DynamicSamplingConfig(**rl["dynamic_sampling"])
    OverlongPenaltyConfig(**rl["overlong"])


def test_recipe_numbers_agree_across_sections(recipe):
    cfg, rl, _ = recipe
    r, v = cfg.rollout, rl["vllm"]
    assert r.sampling([151645], seed=0).n == 8  # the protocol accepts the rollout settings
    assert cfg.train.seq_length == v["max_model_len"] >= cfg.vlm.max_prompt_length + r.max_new_tokens
    assert cfg.train.global_batch_size == r.prompts_per_step * r.n
    assert rl["overlong"]["max_response_len"] == r.max_new_tokens
    assert rl["dynamic_sampling"]["batch_groups"] == r.prompts_per_step
    assert cfg.update.temperature == r.temperature
    replicas, _ = engine_data_parallel(cfg.world_size(), 0, v["tensor_parallel_size"])
    assert r.prompts_per_step % replicas == 0, "every engine replica gets the same number of prompts"
    fused_experts_mib = 128 * 2048 * 2 * 768 * 2 / 2**20  # one layer's gate_up_proj, bf16
    assert r.bucket_mb >= fused_experts_mib


def slurm_env(tmp_path, nodes):
    """test_scripts' fake allocation, with a `scontrol` that writes its host list in one write.

    slurm_train.sbatch runs `scontrol show hostnames ... | head -n 1` under `set -o pipefail`:
    when head exits before a multi-write scontrol finishes, scontrol dies of SIGPIPE and the
    script exits 141 (intermittently, with test_scripts' one-echo-per-host fake).
    """
    env = fake_slurm_env(tmp_path, nodes)
    hosts = "\\n".join(f"gpu-{i:03d}" for i in range(1, nodes + 1))
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\nprintf '{hosts}\\n'\n")
    return env


def test_bash_syntax():
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_renders_multi_node_torchrun_with_the_grpo_recipe(tmp_path):
    env = slurm_env(tmp_path, nodes=4)
    env["SLURM_SUBMIT_DIR"] = str(ROOT)
    result = subprocess.run(["bash", str(SBATCH), "rollout.n=4"], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    for expected in ["--nodes=4", "--nnodes=4", "--nproc-per-node=8",
                     "--rdzv-endpoint=gpu-001:29500", "megatron_vlm.cli train",
                     "--config configs/qwen3_vl_30b_a3b_grpo.yaml", "runtime.nodes=4", "rollout.n=4"]:
        assert expected in srun, f"{expected!r} missing from: {srun}"


def test_sbatch_hands_vllm_settings_to_the_train_script(tmp_path):
    """A stand-in slurm_train.sbatch prints what it receives."""
    fake_root = tmp_path / "checkout"
    (fake_root / "launch").mkdir(parents=True)
    (fake_root / "launch" / "slurm_train.sbatch").write_text(
        'echo "args=$*"\necho "mp=${VLLM_ENABLE_V1_MULTIPROCESSING:-unset}"\n'
        'echo "alloc=${PYTORCH_ALLOC_CONF:-unset}"\n')
    env = slurm_env(tmp_path, nodes=2)
    env.update(MEGATRON_VLM_ROOT=str(fake_root), PYTORCH_ALLOC_CONF="expandable_segments:True")
    result = subprocess.run(["bash", str(SBATCH), "my.yaml", "a.b=1"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["args=my.yaml a.b=1", "mp=0", "alloc=unset"]
    assert "defeats vLLM's sleep mode" in result.stderr
