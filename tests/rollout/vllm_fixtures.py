"""What the real-vLLM workers share: the digits demo's tiny Qwen3-VL-MoE (its HF directory with
tokenizer and processor, the one vLLM builds from), a megatron trainer holding seeded weights at the
launch's layout, prompts with and without an image, and the engine-vs-trainer log-prob comparison.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_vlm.rollout.protocol import SamplingParams

GREEDY = dict(temperature=0.0, max_new_tokens=16, n=1)
SAMPLED = dict(temperature=1.0, max_new_tokens=16, n=4, seed=5)


class Demo:
    """The trainer side of one launch: assets, processor, trainer model, requests."""

    def __init__(self, out_dir: Path, parallel, seed: int = 0):
        from transformers import AutoConfig

        from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
        from megatron_vlm.data.digits import DigitsConfig, build_demo_assets
        from megatron_vlm.data.loading import LoadConfig, load_prompts
        from megatron_vlm.data.processor import MultimodalProcessor
        from megatron_vlm.models import family_for
        from megatron_vlm.parallel.runtime import init_runtime
        from megatron_vlm.trainer.context import PromptCache

        self.runtime = init_runtime(parallel, seed)
        self.assets = Path(out_dir) / "assets"
        if self.runtime.rank == 0 and not (self.assets / "manifest.json").exists():
            build_demo_assets(self.assets, seed, DigitsConfig(seed=seed, num_sft=8, num_rl=16,
                                                              num_eval=8, num_pref=4, num_text=8))
        torch.distributed.barrier()
        self.model_dir = self.assets / "model"
        self.hf_config = AutoConfig.from_pretrained(self.model_dir)
        self.family = family_for(self.hf_config)
        self.rules = self.family.hf_rules(self.hf_config)
        torch.manual_seed(seed)  # transformers' initialisation, identical on every rank
        hf_model = self.family.hf_model_class(self.hf_config)
        self.full = dict(hf_to_mcore(self.rules, hf_model.state_dict().__getitem__))
        del hf_model
        self.parallel = parallel
        self.model = self.trainer()
        self.processor = MultimodalProcessor.from_pretrained(self.model_dir)
        self.cache = PromptCache(self.processor)
        load = LoadConfig(max_prompt_length=256)
        images = load_prompts(self.assets / "rl.parquet", self.processor, load).requests
        self.requests = images[:3] + load_prompts(self.assets / "rl_text.parquet", self.processor,
                                                  load).requests[:1]
        self.many_requests = images  # 16 prompts: a GRPO-sized batch over vLLM's token budget
        for request in images + self.requests:
            self.cache(request)
        tokenizer = self.processor.tokenizer
        self.stop_token_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def trainer(self, dtype: torch.dtype = torch.float32, like=None):
        """A megatron model built in `dtype` as a run builds it (`runtime.params_dtype`), holding
        the seeded weights, or `like`'s current ones (a model of the same layout)."""
        from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict

        model = self.family.build(self.hf_config, self.parallel, "cpu", dtype).eval()
        if like is None:
            load_full_state_dict(model, self.full, RankLayout.current(model.config),
                                 self.hf_config.tie_word_embeddings)
            return model
        theirs = like.state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    tensor.copy_(theirs[name])
        return model

    def sampling(self, **kwargs) -> SamplingParams:
        return SamplingParams(stop_token_ids=self.stop_token_ids, **kwargs)

    def engine_config(self, **kwargs):
        from megatron_vlm.rollout.vllm_engine import VllmEngineConfig

        defaults = dict(model_dir=str(self.model_dir), dtype="float32", max_model_len=256,
                        max_num_seqs=128, cpu_kv_cache_gb=0.125)  # 128: a step over 4096 tokens
        return VllmEngineConfig(**{**defaults, **kwargs})

    def trainer_logprobs(self, samples, model=None) -> list[list[float]]:
        """The trainer's log-probs of the engine's samples (temperature 1)."""
        from megatron_vlm.trainer.actor_batch import build_batch, response_logprobs, score

        batch, _, _ = build_batch(samples, {s.request_id: self.cache.get(s.request_id) for s in samples},
                                  self.pad_id, self.hf_config.vision_config.spatial_merge_size)
        with torch.no_grad():
            return response_logprobs(score(model or self.model, batch, 1.0), batch)


def outputs(samples) -> list[dict]:
    """JSON-able (request, index, tokens, log-probs) of samples."""
    return [dict(request=s.request_id, index=s.index, tokens=s.response_ids, logprobs=s.logprobs,
                 finish=s.finish_reason) for s in samples]


def diff_stats(engine: list[list[float]], trainer: list[list[float]]) -> dict:
    """The sync check's statistics (max, mean, p99 of |diff|, k3 KL, bulk KL) over every token."""
    from megatron_vlm.rollout.weight_sync import SyncCheckConfig, check_logprobs

    unbounded = SyncCheckConfig()  # no bounds: statistics only
    check = check_logprobs(engine, trainer, unbounded)
    return dict(max=check.max_abs, mean=check.mean_abs, p99=check.quantile_abs, kl=check.kl,
                bulk_kl=check.bulk_kl, tokens=check.tokens)
