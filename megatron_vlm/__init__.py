"""megatron_vlm: RL post-training for vision-language mixture-of-experts models on megatron-core.

Layout (dependencies point one way: trainer -> rollout, rl, rewards, models -> parallel):
  config.py    RunConfig made of small per-component dataclasses, YAML recipes, key=value overrides
  parallel/    process groups, device/backend choice (cuda+nccl | cpu+gloo), the CPU compat layer
  models/      model providers; one folder per HF family
  data/ rl/ rewards/ rollout/ trainer/ checkpoint/
"""
import warnings

__version__ = "0.1.0"

# megatron-core warns at import that Transformer Engine / apex are missing: expected on CPU, where
# the local layer spec and torch optimizers are the intended path (parallel/optional.py).
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are|Apex is) not installed")

# With the CPU vLLM extra installed, transformers' image code imports a torchvision whose compiled
# ops cannot load beside the CPU torch; a no-op everywhere else (rollout/vllm_cpu_compat.py).
from megatron_vlm.rollout.vllm_cpu_compat import arm_torchvision_schemas as _arm_schemas

_arm_schemas()
