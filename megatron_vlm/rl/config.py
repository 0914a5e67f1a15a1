"""The RL sections of a run's config: `rollout:` (what the engine samples), `update:` (the policy
update), `rl:` (engine choice and rollout shaping) and `rl.prompt_mix:`.

Plain dataclasses, validated in `__post_init__`, with no trainer import: `megatron_vlm/config.py`
builds a run's config from them without loading the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_vlm.rl.advantages import AdvantageConfig
from megatron_vlm.rl.curriculum import AdaptiveMixConfig, CurriculumConfig
from megatron_vlm.rl.losses import LossConfig
from megatron_vlm.rl.overlong import ForcedAnswerConfig, OverlongPenaltyConfig
from megatron_vlm.rl.rollout_correction import RolloutCorrectionConfig
from megatron_vlm.rl.sampling import DynamicSamplingConfig
from megatron_vlm.rollout.protocol import SamplingParams
from megatron_vlm.rollout.vllm_engine import VllmEngineConfig
from megatron_vlm.rollout.weight_sync import SyncCheckConfig


@dataclass(kw_only=True)
class RolloutConfig:
    prompts_per_step: int = 16
    n: int = 8                       # samples per prompt (group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    bucket_mb: float = 16.0          # weight-sync bucket bound
    sync_check: SyncCheckConfig = field(default_factory=SyncCheckConfig)  # engine vs trainer
    old_logprobs: str = "trainer"    # trainer | engine
    drop_equal_groups: bool = True   # DAPO dynamic-sampling filter (groups with one reward value)

    def __post_init__(self):
        if self.prompts_per_step < 1 or self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("rollout.prompts_per_step, rollout.n, rollout.max_new_tokens must be >= 1")
        if self.old_logprobs not in ("trainer", "engine"):
            raise ValueError(f"rollout.old_logprobs must be trainer|engine, got {self.old_logprobs!r}")
        if self.bucket_mb <= 0:
            raise ValueError(f"rollout.bucket_mb must be > 0, got {self.bucket_mb}")

    def sampling(self, stop_token_ids: list[int], seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, n=self.n,
                              stop_token_ids=stop_token_ids, seed=seed)


@dataclass(kw_only=True)
class RLConfig:
    """Engine choice and the rollout-shaping options of the recipes (`rl:` in a config)."""
    engine: str = "embedded"          # embedded (CPU, transformers) | vllm (GPU)
    # the embedded engine's weights and compute: bfloat16 gives the CPU demo the train / inference
    # mismatch a bf16 vLLM engine brings to an fp32 trainer (what routing replay and rollout
    # correction are for)
    embedded_dtype: str = "float32"   # float32 | bfloat16
    vllm: VllmEngineConfig = field(default_factory=VllmEngineConfig)
    # replay the engine's MoE routing in the trainer (trainer/routing_replay.py): the embedded engine
    # records its routes; vLLM needs rl.vllm.return_routed_experts
    routing_replay: bool = False
    dynamic_sampling: DynamicSamplingConfig | None = None  # DAPO: draw until the batch is informative
    overlong: OverlongPenaltyConfig | None = None           # DAPO soft over-long penalty (reward term)
    mask_truncated: bool = False      # DAPO over-long filtering: truncated responses leave the loss
    prompt_mix: PromptMixConfig | None = None  # difficulty-adaptive mix or curriculum (None: uniform)
    forced_answer: ForcedAnswerConfig | None = None  # GLM-4.5V: close a cut-off think block, answer

    def __post_init__(self):
        if self.engine not in ("embedded", "vllm"):
            raise ValueError(f"rl.engine must be embedded or vllm, got {self.engine!r}")
        if self.embedded_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"rl.embedded_dtype must be float32 or bfloat16, got {self.embedded_dtype!r}")

    def check(self, rollout: RolloutConfig) -> None:
        """Cross-section checks, and refusal of what the stage runner does not apply yet."""
        if self.routing_replay and self.engine == "vllm" and not self.vllm.return_routed_experts:
            raise ValueError("rl.routing_replay with rl.engine=vllm needs rl.vllm.return_routed_experts=true "
                             "(vLLM returns the experts each token used only when asked)")
        if self.overlong is not None and self.overlong.max_response_len != rollout.max_new_tokens:
            raise ValueError(f"rl.overlong.max_response_len ({self.overlong.max_response_len}) must "
                             f"equal rollout.max_new_tokens ({rollout.max_new_tokens})")
        dynamic = self.dynamic_sampling
        if dynamic is not None and dynamic.batch_groups is not None \
                and dynamic.batch_groups > rollout.prompts_per_step * dynamic.max_draws:
            raise ValueError(f"rl.dynamic_sampling.batch_groups ({self.dynamic_sampling.batch_groups}) "
                             f"can never be filled by max_draws x rollout.prompts_per_step")


@dataclass(kw_only=True)
class UpdateConfig:
    temperature: float = 1.0          # = rollout.temperature: a config that leaves it unset follows it,
                                      # another value is refused (RunConfig)
    micro_batch_size: int = 8
    # tokens per packed micro-batch; None = micro_batch_size x the batch's padded width (the
    # padded path's bound). A longer sample is a micro-batch of its own.
    pack_tokens: int | None = None
    optimizer_steps: int = 1          # optimizer steps per rollout batch (mini-batches)
    # With one optimizer step (and no rollout_correction) a separate pass recomputing pi_old would
    # run the very weights and packs the update's forward runs: pi_old is then that forward's own
    # detached log-probs (ratio 1, the gradient of pi / pi.detach()) and the weight-sync check runs
    # on them before the optimizer step, as verl's actor takes log_prob.detach() on its on-policy
    # path (one mini-batch, one epoch). false keeps the separate pass (rollout.old_logprobs: trainer).
    on_policy_old_logprobs: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    # decoupled PPO: IS weights pi_old / pi_engine on the PG term (megatron_vlm.rl.rollout_correction);
    # needs rollout.old_logprobs = trainer. None = off
    rollout_correction: RolloutCorrectionConfig | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"update.temperature must be > 0, got {self.temperature}")
        if self.micro_batch_size < 1 or self.optimizer_steps < 1:
            raise ValueError("update.micro_batch_size and update.optimizer_steps must be >= 1")
        if self.pack_tokens is not None and self.pack_tokens < 1:
            raise ValueError(f"update.pack_tokens must be >= 1 or null, got {self.pack_tokens}")


@dataclass(kw_only=True)
class PromptMixConfig:
    pool_key: str                               # metadata field naming a prompt's pool
    adaptive: AdaptiveMixConfig | None = None   # GLM-4.5V: shares from the last step's pass rates
    curriculum: CurriculumConfig | None = None  # stages of shares, advanced by a rule
    pass_threshold: float = 1.0                 # a response passes when its raw reward >= this

    def __post_init__(self):
        if (self.adaptive is None) == (self.curriculum is None):
            raise ValueError("rl.prompt_mix needs exactly one of adaptive or curriculum")
