"""What the stages of a VLM run share, built once: `RunContext`.

    ctx = build_context(cfg)        # runtime, model + optimizer, reference, engine, scorer, data
    samples = ctx.sample(requests, sampling)     # sync the policy into the engine, generate, sleep
    batch, result = ctx.score(samples)           # verifiers / reward model
    ctx.evaluate()                               # held-out accuracy (greedy)

Setup builds the megatron VLM from the HF config in `vlm.assets/model` in `runtime.params_dtype`
(weights from `vlm.init_from`, each rank reading only its share; or, with `vlm.random_init`,
transformers' initialiser, seeded, identical on every rank), a colocated engine on every rank
(embedded, or vLLM built after the trainer so it sizes its KV cache from what is left), and the
reward scorer. A stage (trainer/stages/) builds none of these: it takes them from here.

State a checkpoint keeps from here (`state_dict`): the data draws (the SFT / preference sampler's
RNG and the prompt mix) and the reward normalisation statistics. The model, optimizer and
reference policy are saved by checkpoint/run_state.py.
"""
from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from megatron_vlm.checkpoint.convert import load_weights
from megatron_vlm.checkpoint.hf_rules import hf_to_mcore
from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict
from megatron_vlm.data.loading import (check_prompt_counts, load_mixture, load_prompts, load_sft_requests,
                                        require_rows, select_kinds)
from megatron_vlm.data.processor import MultimodalProcessor
from megatron_vlm.models import family_for
from megatron_vlm.models.source import resolve_hf_config
from megatron_vlm.parallel.runtime import init_runtime
from megatron_vlm.rewards.judge import load_judge
from megatron_vlm.rewards.reward_model import load_reward_model
from megatron_vlm.rewards.scorer import RewardConfig, RewardSample, RewardScorer
from megatron_vlm.rollout.embedded import EmbeddedEngine, Prepared
from megatron_vlm.trainer.routing_replay import moe_routers
from megatron_vlm.rollout.protocol import RolloutRequest, RolloutSample, SamplingParams
from megatron_vlm.rollout.weight_sync import sync_weights
from megatron_vlm.trainer.evaluation import accuracy_metrics, sample_kind
from megatron_vlm.trainer.grpo import Actor, generate_share
from megatron_vlm.trainer.megatron_step import build_optimizer, wrap_ddp
from megatron_vlm.trainer.prompt_mix import PromptMix, random_state, set_random_state
from megatron_vlm.trainer.reference import ReferencePolicy

PREFERENCE_KINDS = ("dpo", "mpo")


class PromptCache:
    """Processor outputs by request id: the engine and the trainer both need them."""

    def __init__(self, processor):
        self.processor, self.items = processor, {}

    def __call__(self, request: RolloutRequest) -> Prepared:
        if request.request_id in self.items:
            return self.items[request.request_id]
        out = self.processor(request.prompt_ids, request.images)
        prepared = Prepared(out["input_ids"][0], out["mm_token_type_ids"][0], out.get("pixel_values"),
                            out.get("image_grid_thw"))
        if not request.metadata.get("ephemeral"):  # one-off requests (forced-answer continuations)
            self.items[request.request_id] = prepared
        return prepared

    def get(self, request_id: str) -> Prepared:
        return self.items[request_id]


@dataclass
class RunData:
    """The run's prompts and how they are drawn: the same on every rank (seeded)."""
    prompts: list[RolloutRequest]
    evals: list[RolloutRequest]
    sft: list[RolloutRequest]
    mix: PromptMix                  # GRPO / RFT prompts: uniform, adaptive mix or curriculum
    rng: random.Random              # SFT examples and preference pairs
    pairs: list[RolloutRequest] | None = None  # preference pairs, loaded by the first dpo / mpo step
    by_id: dict[str, RolloutRequest] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"rng": random_state(self.rng), "mix": self.mix.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        set_random_state(self.rng, state["rng"])
        self.mix.load_state_dict(state["mix"])


@dataclass
class RunContext:
    cfg: object                     # the RunConfig
    assets: Path
    runtime: object                 # parallel.runtime.Runtime
    hf_config: object
    family: object
    processor: MultimodalProcessor
    cache: PromptCache
    data: RunData
    actor: Actor
    engine: object                  # rollout engine (embedded or vLLM)
    scorer: RewardScorer

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    def state_dict(self) -> dict:
        return {"data": self.data.state_dict(), "scorer": self.scorer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])
        self.scorer.load_state_dict(state["scorer"])

    # -- sampling and scoring, shared by the stages -------------------------------------------
    def draw(self) -> list[RolloutRequest]:
        """The next prompts of the mix (the same on every rank), processed once."""
        requests = self.data.mix.draw()
        for request in requests:
            self.cache(request)
        return requests

    def sample(self, requests: list[RolloutRequest], sampling: SamplingParams) -> list[RolloutSample]:
        """Sync the policy into the engine, generate, put the engine back to sleep."""
        sync_weights(self.actor.model, self.actor.rules, self.engine, int(self.cfg.rollout.bucket_mb * 2**20))
        samples = generate_share(self.actor, self.engine, requests, sampling)
        self.engine.sleep()
        return samples

    def score(self, samples: list[RolloutSample], log_failures: bool = True):
        """(reward samples, the scorer's result) for `samples`."""
        batch = [self.reward_sample(s) for s in samples]
        result = self.scorer.score(batch)
        if log_failures and self.runtime.rank == 0:
            for failure in result.failures[:3]:  # counted in the metrics; a few named in the log
                print(f"reward {failure.kind} for sample {failure.sample_id}: {failure.message[:200]}")
        return batch, result

    def reward_sample(self, s: RolloutSample) -> RewardSample:
        """prompt_id: the request, so best-of-N groups by prompt even where question texts repeat."""
        return RewardSample(sample_id=f"{s.request_id}#{s.index}", task=s.metadata.get("task", "default"),
                            prompt=s.metadata.get("question", ""), response=self.text(s.response_ids),
                            reference=s.metadata.get("reference"),
                            metadata={**s.metadata, "prompt_id": s.request_id})

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False).replace(self.tokenizer.eos_token or "", "")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out accuracy, overall and per kind (`trainer/evaluation.py`): greedy answers to unseen
        images, checked by the verifier; strict when also well formed."""
        start = time.perf_counter()
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.eval.max_new_tokens, n=1,
                                stop_token_ids=self.actor.stop_token_ids)
        samples = self.sample(self.data.evals, greedy)
        running = self.scorer.state_dict()  # evaluation must not move the normalisation statistics
        _, result = self.score(samples, log_failures=False)
        self.scorer.load_state_dict(running)
        column = self.cfg.vlm.kinds.column
        kinds = [sample_kind(s.metadata, column) for s in samples]
        metrics = accuracy_metrics(kinds, [verdict >= 1.0 for verdict in result.verdicts], result.well_formed,
                                   {c: [s.metadata.get(c) for s in samples] for c in self.cfg.eval.slice_by},
                                   per_kind=any(column in s.metadata for s in samples) or None)
        return {**metrics, "eval_seconds": time.perf_counter() - start}  # not in step_seconds

    def close(self) -> None:
        if hasattr(self.engine, "close"):  # vLLM: before the process groups are destroyed
            self.engine.close()
        self.scorer.close()


@contextmanager
def phase(what: str, announce: bool):
    """A set-up phase that says what it is doing and how long it took (rank 0)."""
    start = time.perf_counter()
    if announce:
        print(f"{what} ...", flush=True)
    yield
    if announce:
        print(f"{what}: done in {time.perf_counter() - start:.1f} s", flush=True)


def build_context(cfg) -> RunContext:
    announce = int(os.environ.get("RANK", 0)) == 0
    with phase(f"assets in {cfg.vlm.assets}", announce):
        assets = ensure_assets(cfg)
    runtime = init_runtime(cfg.parallel, cfg.runtime.seed, cfg.runtime.device)
    hf_config, _ = resolve_hf_config(cfg.vlm)  # assets/model, checked against model_config
    family = family_for(hf_config)
    processor = MultimodalProcessor.from_pretrained(assets / "model")
    cache = PromptCache(processor)
    with phase("data", announce):
        data = load_data(cfg, assets, processor, announce=announce)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    source = cfg.vlm.init_from or "random init"
    with phase(f"policy {family.architecture} (weights: {source})", announce):
        model, ddp, optimizer, scheduler = build_policy(cfg, runtime, family, hf_config)
    actor = Actor(model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler,
                  rules=family.hf_rules(hf_config), prepared=cache.get, pad_id=pad,
                  spatial_merge_size=hf_config.vision_config.spatial_merge_size,
                  stop_token_ids=sorted(t for t in {tokenizer.eos_token_id} if t is not None),
                  tokenizer=tokenizer, image_token_id=hf_config.image_token_id)
    if needs_reference(cfg):
        actor.reference = ReferencePolicy.build(family, hf_config, cfg.parallel, runtime.device.type,
                                                model.config.params_dtype, cfg.runtime.backend)
    with phase(f"rollout engine ({cfg.rl.engine})", announce):
        engine = build_engine(cfg, assets, hf_config, cache, pad, runtime.device.type)
    tasks = {r.metadata.get("task", "default") for r in data.prompts + data.evals}
    reward_model = load_reward_model(cfg.reward_model) if cfg.reward_model is not None else None
    judge = load_judge(cfg.judge) if cfg.judge is not None else None
    scorer = RewardScorer(reward_config(cfg, tasks), reward_model, judge)
    # every reference its verifier would refuse, named now rather than counted at scoring time
    scorer.check_samples([RewardSample(sample_id=r.request_id, task=r.metadata.get("task", "default"),
                                       prompt=r.metadata.get("question", ""), response=None,
                                       reference=r.metadata.get("reference"), metadata=r.metadata)
                          for r in data.prompts + data.evals])
    return RunContext(cfg=cfg, assets=assets, runtime=runtime, hf_config=hf_config, family=family,
                      processor=processor, cache=cache, data=data, actor=actor, engine=engine,
                      scorer=scorer)


def load_data(cfg, assets: Path, processor, announce: bool) -> RunData:
    """The run's prompt, eval and SFT sets, each cut to its `vlm.kinds` and checked before the
    model is built (an empty set, fewer prompts than one step draws, SFT rows without a response,
    a kind the file lacks: one line naming the file and column or the config field)."""
    load = replace(cfg.vlm.load, max_prompt_length=cfg.vlm.max_prompt_length)
    kinds, column = cfg.vlm.kinds, cfg.vlm.kinds.column
    stage_kinds = {stage.kind for stage in cfg.stages}
    if cfg.vlm.prompt_sources:  # a mixture with per-source ratios (paths relative to the assets)
        sources = [replace(s, path=[str(assets / p) for p in ([s.path] if isinstance(s.path, str) else s.path)])
                   for s in cfg.vlm.prompt_sources]
        prompt_source = "vlm.prompt_sources"
        loaded = load_mixture(sources, processor, load, seed=cfg.runtime.seed)
    else:
        prompt_source = assets / cfg.vlm.prompt_data
        loaded = load_prompts(prompt_source, processor, load)
    loaded = select_kinds(loaded, kinds.rl, column, source=prompt_source, field="vlm.kinds.rl")
    if announce:
        print(f"prompts: {loaded.counts}" + "".join(f"\n  {p}" for p in loaded.problems[:5]), flush=True)
    eval_source = assets / cfg.vlm.eval_data
    evals = select_kinds(load_prompts(eval_source, processor, load), kinds.eval, column, source=eval_source,
                         field="vlm.kinds.eval")
    sft_source = assets / cfg.vlm.sft_data
    sft = None
    if "sft" in stage_kinds:
        sft = select_kinds(load_sft_requests(sft_source, processor, load), kinds.sft, column, source=sft_source,
                           field="vlm.kinds.sft")
        if announce and kinds.sft is not None:
            print(f"sft: {sft.counts} ({column} in {kinds.sft})", flush=True)
    if stage_kinds & {"grpo", "rft"}:
        check_prompt_counts(loaded, evals, cfg.rollout.prompts_per_step, prompt_source=prompt_source,
                            eval_source=eval_source, sft=sft, sft_source=sft_source)
    else:
        require_rows(evals, eval_source, "eval")
        if sft is not None:
            require_rows(sft, sft_source, "sft")
    prompts = loaded.requests
    mix = PromptMix(prompts, cfg.rl.prompt_mix, cfg.rollout.prompts_per_step, cfg.runtime.seed)
    return RunData(prompts=prompts, evals=evals.requests[: cfg.eval.samples], sft=sft.requests if sft else [],
                   mix=mix, rng=random.Random(cfg.runtime.seed), by_id={r.request_id: r for r in prompts})


def build_engine(cfg, assets: Path, hf_config, cache: PromptCache, pad: int, device_type: str):
    if cfg.rl.engine == "vllm":  # built after the trainer: it sizes its KV cache from free memory
        from megatron_vlm.rollout.vllm_engine import VllmEngine  # imports vllm: only when asked for

        engine = VllmEngine(replace(cfg.rl.vllm, model_dir=cfg.rl.vllm.model_dir or str(assets / "model")),
                            device_type)
        engine.sleep()
        return engine
    return EmbeddedEngine(hf_config, prepare=cache, pad_token_id=pad, return_routed_experts=cfg.rl.routing_replay,
                          dtype=getattr(torch, cfg.rl.embedded_dtype))


def needs_reference(cfg) -> bool:
    kl = cfg.update.loss.kl_type != "none"
    return any((stage.kind == "grpo" and kl) or stage.kind in PREFERENCE_KINDS for stage in cfg.stages)


def reward_config(cfg, tasks: set[str]) -> RewardConfig:
    """`reward:` as given, else every task of the data scored by `vlm.verifier`."""
    if cfg.reward is None:
        return RewardConfig(verifiers={t: cfg.vlm.verifier for t in sorted(tasks)}, num_workers=1)
    missing = sorted(tasks - set(cfg.reward.verifiers))
    if missing:
        raise ValueError(f"reward.verifiers has no entry for tasks {missing} found in the data "
                         f"(configured: {sorted(cfg.reward.verifiers)})")
    return cfg.reward


def ensure_assets(cfg) -> Path:
    """`vlm.assets`, written first with `vlm.build_demo_assets` when missing or written by another
    version of the digits demo (its manifest's settings differ from the demo's now: e.g. 500 eval
    rows where there are 1,500), so a run never trains on stale demo files."""
    if cfg.vlm.assets is None:
        raise ValueError("vlm.assets must name the assets directory (model/ + data files)")
    assets = Path(cfg.vlm.assets)
    if not cfg.vlm.build_demo_assets:
        if (assets / "model" / "config.json").is_file():
            return assets
        raise FileNotFoundError(f"{assets / 'model' / 'config.json'} not found; set "
                                f"vlm.build_demo_assets=true to write the digits demo there")
    from megatron_vlm.data.digits import DigitsConfig, build_demo_assets  # matplotlib fonts: only for the demo

    wanted = asdict(DigitsConfig(seed=cfg.runtime.seed))
    ready = assets / ".ready"
    if int(os.environ.get("RANK", 0)) == 0 and not _demo_assets_match(assets, wanted):
        if ready.exists():
            print(f"{assets}: written by another version of the digits demo; rewriting it", flush=True)
            ready.unlink()
        build_demo_assets(assets, seed=cfg.runtime.seed)
        ready.write_text("ok")
    deadline = time.monotonic() + 600
    while not (ready.exists() and _demo_assets_match(assets, wanted)):  # other ranks wait for rank 0
        if time.monotonic() > deadline:  # (no process group exists yet)
            raise TimeoutError(f"rank 0 did not finish writing {assets}")
        time.sleep(0.5)
    return assets


def _demo_assets_match(assets: Path, wanted: dict) -> bool:
    """Whether `assets` holds a complete digits demo written with the settings `wanted` (the
    manifest is written last)."""
    try:
        manifest = json.loads((assets / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("digits") == wanted and (assets / "model" / "config.json").is_file()


def build_policy(cfg, runtime, family, hf_config):
    """The policy in `runtime.params_dtype` (megatron's mixed-precision optimizer keeps fp32 master
    weights and Adam state for bf16 params), weights from `vlm.init_from` or seeded random init."""
    cfg.vlm.check_weights_source()
    # random weights first: the seeded draw comes before the build, as it always has
    full = None if cfg.vlm.init_from else random_weights(cfg.runtime.seed, family, hf_config)
    replay = {"moe_enable_routing_replay": True} if cfg.rl.routing_replay else {}  # routers replay the engine's
    model = family.build(hf_config, cfg.parallel, runtime.device.type, cfg.runtime.torch_dtype,
                         backend=cfg.runtime.backend, calculate_per_token_loss=True, **replay)
    if cfg.rl.routing_replay and not moe_routers(model):
        raise ValueError(f"rl.routing_replay needs an MoE model; {family.architecture} has no routed experts")
    if full is not None:
        load_full_state_dict(model, full, RankLayout.current(model.config), hf_config.tie_word_embeddings)
    else:
        loaded = load_weights(model, cfg.vlm.init_from, family, hf_config)
        if runtime.rank == 0:
            print(f"weights: {loaded}", flush=True)
    ddp = wrap_ddp(model, cfg.parallel.distributed_optimizer)
    total = sum(stage.steps for stage in cfg.stages) or 1
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.parallel.distributed_optimizer, total)
    return model, ddp, optimizer, scheduler


def random_weights(seed: int, family, hf_config) -> dict:
    """transformers' initialisation as full megatron tensors, seeded, so identical on every rank
    (the full HF model is built on each: for the demo and tests, never for a real model)."""
    torch.manual_seed(seed)
    hf_model = family.hf_model_class(hf_config)
    return dict(hf_to_mcore(family.hf_rules(hf_config), hf_model.state_dict().__getitem__))
