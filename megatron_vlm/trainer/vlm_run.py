"""A VLM post-training run: a list of stages (SFT, GRPO, RFT, DPO, MPO) over one model, ending in
an HF export.

    megatron-vlm train --config configs/digits_demo.yaml

Setup builds the megatron VLM from the HF config in `vlm.assets/model` in `runtime.params_dtype`
(weights from `vlm.init_from`, each rank reading only its share; or, with `vlm.random_init`,
transformers' initialiser, seeded, identical on every rank), a colocated embedded engine on every
rank, and the reward scorer. Each stage runs its steps; held-out accuracy (greedy decoding through
the engine, scored by the task's verifier) is measured before training, every `eval.every` steps
and at the end of each stage. Metrics: `train.out_dir/metrics.jsonl` (one object per step with its stage), the
curves in `curves.png`; the final policy is exported to `train.out_dir/hf_export/`.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from megatron_vlm.data.loading import LoadConfig, SourceConfig
from megatron_vlm.rollout.embedded import Prepared
from megatron_vlm.rollout.protocol import RolloutRequest, RolloutSample, SamplingParams


PREFERENCE_KINDS = ("dpo", "mpo")
STAGE_KINDS = ("sft", "grpo", "rft") + PREFERENCE_KINDS


@dataclass(kw_only=True)
class StageConfig:
    kind: str                 # sft | grpo | rft (rejection-sampling fine-tuning) | dpo | mpo
    steps: int
    batch_size: int = 32      # sft: labelled examples per step (grpo uses rollout.prompts_per_step)
    lr: float | None = None   # a constant rate for this stage; None: optim's schedule continues
    reset_optimizer: bool = False  # start the stage with fresh Adam moments (RL after SFT)

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stages[].kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"stages[] {self.kind}: lr must be > 0, got {self.lr}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"stages[] {self.kind}: steps must be >= 0 and batch_size >= 1")


@dataclass(kw_only=True)
class VLMConfig:
    assets: str | None = None        # dir with model/ (HF config, tokenizer, processor) + data
    build_demo_assets: bool = False  # write the digits demo assets there first when missing
    init_from: str | None = None     # the weights to start from: an HF checkpoint dir (each rank
                                     # reads only its slice) or `megatron-vlm convert hf-to-mcore`
                                     # output of the run's layout (each rank its own files)
    random_init: bool = False        # no weights: transformers' seeded initialiser (demos, tests);
                                     # a run names init_from or asks for this
    model_config: str | None = None  # dir with a copy of the model's config.json: what `plan` and
                                     # `check` read where assets/model is not at hand; must agree
                                     # with assets/model (trainer/model_source.py)
    sft_data: str = "sft.parquet"
    prompt_data: str = "rl.parquet"
    eval_data: str = "eval.parquet"
    preference_data: str = "pref.parquet"  # dpo / mpo stages: prompt, chosen, rejected
    prompt_sources: list[SourceConfig] | None = None  # instead of prompt_data: a mixture by ratio
    load: LoadConfig = field(default_factory=LoadConfig)  # transforms (MCQ -> fill-in, question
                                                          # into the image), template, length rules
    max_prompt_length: int = 256     # the loader's limit (expanded tokens): one place to set it
    verifier: str = "numeric"        # for every task of the prompt files
    export: bool = True

    def __post_init__(self):
        if self.load.max_prompt_length is not None:
            raise ValueError("set vlm.max_prompt_length, not vlm.load.max_prompt_length")
        if self.init_from and self.random_init:
            raise ValueError(f"vlm.init_from ({self.init_from}) and vlm.random_init: true both set: "
                             f"start from those weights (random_init: false) or from none")

    def check_weights_source(self) -> None:
        """A run starts from real weights unless it asks for a random model."""
        if not self.init_from and not self.random_init:
            raise ValueError("vlm.init_from is not set: name the weights to start from (an HF "
                             "checkpoint dir, or `megatron-vlm convert hf-to-mcore` output), or set "
                             "vlm.random_init: true to train a randomly initialised model (demos, tests)")


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 20
    samples: int = 128
    max_new_tokens: int = 32

    def __post_init__(self):
        if self.every < 1 or self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.every, eval.samples and eval.max_new_tokens must be >= 1")


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


def run(cfg, keep_runtime: bool = False) -> list[dict]:
    """The run's stages; returns the logged rows (rank 0). `keep_runtime` leaves the process
    groups up for another run in the same processes (tests running several recipes)."""
    from megatron_vlm.parallel.runtime import shutdown

    cfg.rl.check(cfg.rollout)
    r = _Run(cfg)
    try:
        r.log(dict(stage="init", step=0, **r.evaluate()))
        for stage in cfg.stages:
            if stage.lr is not None:
                from megatron_vlm.trainer.megatron_step import set_constant_lr

                set_constant_lr(r.actor.optimizer, r.actor.scheduler, stage.lr)
            if stage.reset_optimizer:
                from megatron_vlm.trainer.megatron_step import reset_optimizer_state

                reset_optimizer_state(r.actor.optimizer)
            if r.actor.reference is not None:
                r.actor.reference.reset_from(r.actor.model)  # pi_ref = the policy entering the stage
            for step in range(1, stage.steps + 1):
                start = time.perf_counter()
                metrics = r.step(stage, step)
                metrics.update(stage=stage.kind, step=step, step_seconds=time.perf_counter() - start)
                if step % cfg.eval.every == 0 or step == stage.steps:
                    metrics.update(r.evaluate())
                r.log(metrics)
        if cfg.vlm.export:
            r.export()
        return r.log.rows
    finally:
        r.close()
        if not keep_runtime:
            shutdown()


class _Run:
    def __init__(self, cfg):
        from megatron_vlm.data.loading import load_mixture, load_prompts
        from megatron_vlm.data.processor import MultimodalProcessor
        from megatron_vlm.models import family_for
        from megatron_vlm.parallel.runtime import init_runtime
        from megatron_vlm.rewards.scorer import RewardScorer
        from megatron_vlm.trainer.grpo import Actor
        from megatron_vlm.trainer.model_source import resolve_hf_config

        self.cfg = cfg
        self.assets = _assets(cfg)
        self.runtime = init_runtime(cfg.parallel, cfg.runtime.seed, cfg.runtime.device)
        self.hf_config, _ = resolve_hf_config(cfg.vlm)  # assets/model, checked against model_config
        self.family = family_for(self.hf_config)
        self.processor = MultimodalProcessor.from_pretrained(self.assets / "model")
        self.tokenizer = self.processor.tokenizer
        self.cache = PromptCache(self.processor)
        load = self.load_config = replace(cfg.vlm.load, max_prompt_length=cfg.vlm.max_prompt_length)
        if cfg.vlm.prompt_sources:  # a mixture with per-source ratios (paths relative to the assets)
            sources = [replace(s, path=[str(self.assets / p) for p in ([s.path] if isinstance(s.path, str)
                                                                     else s.path)])
                       for s in cfg.vlm.prompt_sources]
            loaded = load_mixture(sources, self.processor, load, seed=cfg.runtime.seed)
        else:
            loaded = load_prompts(self.assets / cfg.vlm.prompt_data, self.processor, load)
        self.prompts = loaded.requests
        if self.runtime.rank == 0:
            print(f"prompts: {loaded.counts}" + "".join(f"\n  {p}" for p in loaded.problems[:5]), flush=True)
        self.evals = load_prompts(self.assets / cfg.vlm.eval_data, self.processor, load).requests[: cfg.eval.samples]
        sft_path = self.assets / cfg.vlm.sft_data
        self.sft = load_prompts(sft_path, self.processor, load).requests if sft_path.exists() else []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        stops = {self.tokenizer.eos_token_id}
        model, ddp, optimizer, scheduler = _build_policy(cfg, self.runtime, self.family, self.hf_config)
        self.actor = Actor(model=model, ddp=ddp, optimizer=optimizer, scheduler=scheduler,
                           rules=self.family.hf_rules(self.hf_config), prepared=self.cache.get,
                           pad_id=pad, spatial_merge_size=self.hf_config.vision_config.spatial_merge_size,
                           stop_token_ids=sorted(t for t in stops if t is not None),
                           tokenizer=self.tokenizer, image_token_id=self.hf_config.image_token_id)
        if _needs_reference(cfg):
            from megatron_vlm.trainer.reference import ReferencePolicy

            self.actor.reference = ReferencePolicy.build(self.family, self.hf_config, cfg.parallel,
                                                         self.runtime.device.type, model.config.params_dtype,
                                                         cfg.runtime.backend)
        self.engine = self._engine(cfg, pad)
        tasks = {r.metadata.get("task", "default") for r in self.prompts + self.evals}
        reward_model = None
        if cfg.reward_model is not None:
            from megatron_vlm.rewards.reward_model import load_reward_model

            reward_model = load_reward_model(cfg.reward_model)
        self.scorer = RewardScorer(_reward_config(cfg, tasks), reward_model)
        self.rng = random.Random(cfg.runtime.seed)
        self.pairs = None  # preference pairs, loaded by the first dpo / mpo step
        from megatron_vlm.trainer.prompt_mix import PromptMix

        self.mix = PromptMix(self.prompts, cfg.rl.prompt_mix, cfg.rollout.prompts_per_step, cfg.runtime.seed)
        self.by_id = {r.request_id: r for r in self.prompts}
        self.scored: list = []  # (request, raw reward) of this GRPO step, for the prompt mix
        from megatron_vlm.rl.preference import RewardShift

        self.reward_shift = RewardShift()
        self.log = _Logger(Path(cfg.train.out_dir), self.runtime.rank == 0)

    def _engine(self, cfg, pad: int):
        if cfg.rl.engine == "vllm":  # built after the trainer: it sizes its KV cache from free memory
            from megatron_vlm.rollout.vllm_engine import VllmEngine

            engine = VllmEngine(replace(cfg.rl.vllm, model_dir=cfg.rl.vllm.model_dir
                                        or str(self.assets / "model")), self.runtime.device.type)
            engine.sleep()
            return engine
        from megatron_vlm.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(self.hf_config, prepare=self.cache, pad_token_id=pad)

    # -- stages ---------------------------------------------------------------------------------
    def step(self, stage, step: int) -> dict:
        if stage.kind == "sft":
            return self.sft_step(stage, step)
        if stage.kind == "grpo":
            return self.grpo_step(step)
        if stage.kind == "rft":
            return self.rft_step(step)
        return self.preference_step(stage)

    def preference_step(self, stage) -> dict:
        """One offline DPO / MPO step on `batch_size` pairs, against the reference policy (the
        policy that entered the stage)."""
        from megatron_vlm.trainer.preference import pair_batch, preference_step

        if self.pairs is None:
            from megatron_vlm.data.loading import load_preferences

            path = self.assets / self.cfg.vlm.preference_data
            if not path.exists():
                raise FileNotFoundError(f"a {stage.kind} stage needs preference pairs: {path} "
                                        f"(columns: the prompt's, chosen, rejected)")
            self.pairs = load_preferences(path, self.processor, self.load_config).requests
        chosen = self.rng.sample(self.pairs, min(stage.batch_size, len(self.pairs)))
        pairs = pair_batch(chosen, self.cache, self.actor.pad_id, self.actor.spatial_merge_size)
        mbs = self.cfg.update.micro_batch_size
        ref = self.actor.reference.score(pairs.batch, pairs.images_per_row, pairs.patches, 1.0, mbs)
        metrics = preference_step([self.actor.ddp], self.actor.optimizer, self.actor.scheduler,
                                  pairs.batch, pairs.images_per_row, pairs.patches, ref,
                                  replace(self.cfg.preference, name=stage.kind), mbs,
                                  reward_shift=self.reward_shift)
        if "bco_reward_sum" in metrics:  # MPO's BCO shift: the running mean of implicit rewards
            self.reward_shift = self.reward_shift.update(metrics["bco_reward_sum"],
                                                         metrics["bco_reward_count"])
        return metrics

    def sft_step(self, stage, step: int) -> dict:
        from megatron_vlm.trainer.sft import labelled_sample

        if not self.sft:
            raise ValueError(f"an sft stage needs labelled data: {self.assets / self.cfg.vlm.sft_data}")
        chosen = self.rng.sample(self.sft, min(stage.batch_size, len(self.sft)))
        samples = []
        for request in chosen:
            target = self.tokenizer(request.metadata["response"], add_special_tokens=False).input_ids
            if not target or target[-1] != self.tokenizer.eos_token_id:  # end once, not twice
                target = target + [self.tokenizer.eos_token_id]
            samples.append(labelled_sample(request.request_id, self.cache(request).input_ids.tolist(),
                                           target))
        return self._imitate(samples)

    def _imitate(self, samples) -> dict:
        """One SFT optimizer step on labelled samples (prompt ids expanded, response = target)."""
        from megatron_vlm.trainer.actor_batch import build_batch
        from megatron_vlm.trainer.sft import sft_step

        batch, images, patches = build_batch(samples, {s.request_id: self.cache.get(s.request_id)
                                                       for s in samples},
                                             self.actor.pad_id, self.actor.spatial_merge_size)
        return sft_step([self.actor.ddp], self.actor.optimizer, self.actor.scheduler, batch, images,
                        patches, self.cfg.update.micro_batch_size)

    def rft_step(self, step: int) -> dict:
        """Rejection-sampling fine-tuning (Intern-S1's offline RL, best-of-N): sample n responses
        per prompt, keep the best verified ones (`rejection:`), imitate them; the kept examples are
        appended to train.out_dir/rejection_sft.jsonl as SFT data."""
        from megatron_vlm.rl.rejection import build_rejection_sft
        from megatron_vlm.trainer.sft import labelled_sample

        start = time.perf_counter()
        samples = self._sample(self._draw(), self.cfg.rollout.sampling(self.actor.stop_token_ids, step))
        rollout_seconds = time.perf_counter() - start
        scored, result = self._score(samples)
        examples, stats = build_rejection_sft(scored, result.raw, self.cfg.rejection,
                                              [f.sample_id for f in result.failures])
        metrics = {"reward": sum(result.raw) / max(1, len(result.raw)), "samples": len(samples),
                   "time_rollout": rollout_seconds, **{f"rejection_{k}": v for k, v in stats.items()}}
        metrics.update(self._observe_mix())
        if not examples:
            return metrics  # no prompt solved: nothing to imitate this step
        by_sample = {f"{s.request_id}#{s.index}": s for s in samples}
        kept = [by_sample[e.sample_id] for e in examples]
        metrics.update(self._imitate([labelled_sample(s.request_id, s.prompt_ids, s.response_ids)
                                      for s in kept]))
        if self.runtime.rank == 0:
            with open(Path(self.cfg.train.out_dir) / "rejection_sft.jsonl", "a") as f:
                for e in examples:
                    f.write(json.dumps({"id": e.sample_id, "task": e.task, "question": e.prompt,
                                        "response": e.response, "reward": e.reward,
                                        "pass_rate": e.pass_rate}) + "\n")
        return metrics

    def grpo_step(self, step: int) -> dict:
        from megatron_vlm.trainer.grpo import grpo_step

        metrics = grpo_step(self.actor, self.engine, self._draw, self.rewards, self.cfg.rollout,
                            self.cfg.update, step, self.cfg.rl)
        metrics.update(self._observe_mix())
        return metrics

    # -- sampling and scoring, shared by the stages ------------------------------------------------
    def _draw(self) -> list[RolloutRequest]:
        """The next prompts (the same on every rank: the mix is seeded), processed once."""
        requests = self.mix.draw()
        for request in requests:
            self.cache(request)
        return requests

    def _sample(self, requests: list[RolloutRequest], sampling: SamplingParams) -> list[RolloutSample]:
        """Sync the policy into the engine, generate, put the engine back to sleep."""
        from megatron_vlm.rollout.weight_sync import sync_weights
        from megatron_vlm.trainer.grpo import generate_share

        sync_weights(self.actor.model, self.actor.rules, self.engine, int(self.cfg.rollout.bucket_mb * 2**20))
        samples = generate_share(self.actor, self.engine, requests, sampling)
        self.engine.sleep()
        return samples

    def _score(self, samples: list[RolloutSample]):
        """(reward samples, the scorer's result) for training samples; their raw rewards feed
        the prompt mix (`_observe_mix`)."""
        batch = [self._reward_sample(s) for s in samples]
        result = self.scorer.score(batch)
        if self.runtime.rank == 0:
            for failure in result.failures[:3]:  # counted in the metrics; a few named in the log
                print(f"reward {failure.kind} for sample {failure.sample_id}: {failure.message[:200]}")
        self.scored += [(self.by_id[s.request_id], raw) for s, raw in zip(samples, result.raw)]
        return batch, result

    def _observe_mix(self) -> dict:
        """Feed this step's (request, raw reward) pairs to the prompt mix; its metrics."""
        metrics, self.scored = self.mix.observe(self.scored), []
        return metrics

    def rewards(self, samples: list[RolloutSample]):
        from megatron_vlm.trainer.grpo import Rewards

        _, result = self._score(samples)
        return Rewards(torch.tensor(result.rewards, dtype=torch.float),
                       torch.tensor(result.raw, dtype=torch.float), result.metrics)

    def _reward_sample(self, s: RolloutSample):
        """prompt_id: the request, so best-of-N groups by prompt even where question texts repeat."""
        from megatron_vlm.rewards.scorer import RewardSample

        return RewardSample(sample_id=f"{s.request_id}#{s.index}", task=s.metadata.get("task", "default"),
                            prompt=s.metadata.get("question", ""), response=self._text(s.response_ids),
                            reference=s.metadata.get("reference"),
                            metadata={**s.metadata, "prompt_id": s.request_id})

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False).replace(self.tokenizer.eos_token or "", "")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out accuracy: greedy answers to unseen images, checked by the verifier."""
        greedy = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.eval.max_new_tokens, n=1,
                                stop_token_ids=self.actor.stop_token_ids)
        samples = self._sample(self.evals, greedy)
        running = self.scorer.state_dict()  # evaluation must not move the normalisation statistics
        rewards = torch.tensor(self.scorer.score(
            [self._reward_sample(s) for s in samples]).raw, dtype=torch.float)
        self.scorer.load_state_dict(running)
        return {"eval_accuracy": float((rewards >= 1.0).float().mean()), "eval_samples": len(samples)}

    def export(self) -> None:
        from megatron_vlm.checkpoint.convert import export_model

        out = Path(self.cfg.train.out_dir) / "hf_export"
        if self.runtime.rank == 0 and out.exists():
            import shutil

            shutil.rmtree(out)
        torch.distributed.barrier()
        export_model(self.actor.model, self.actor.rules, self.hf_config, str(out),
                     side_files_from=str(self.assets / "model"))

    def close(self) -> None:
        if hasattr(self.engine, "close"):  # vLLM: before the process groups are destroyed
            self.engine.close()
        self.scorer.close()
        self.log.close()
        if self.runtime.rank == 0 and self.log.rows:
            plot_curves(self.log.rows, Path(self.cfg.train.out_dir) / "curves.png")


def _needs_reference(cfg) -> bool:
    kl = cfg.update.loss.kl_type != "none"
    return any((stage.kind == "grpo" and kl) or stage.kind in PREFERENCE_KINDS for stage in cfg.stages)


def _reward_config(cfg, tasks: set[str]):
    """`reward:` as given, else every task of the data scored by `vlm.verifier`."""
    from megatron_vlm.rewards.scorer import RewardConfig

    if cfg.reward is None:
        return RewardConfig(verifiers={t: cfg.vlm.verifier for t in sorted(tasks)}, num_workers=1)
    missing = sorted(tasks - set(cfg.reward.verifiers))
    if missing:
        raise ValueError(f"reward.verifiers has no entry for tasks {missing} found in the data "
                         f"(configured: {sorted(cfg.reward.verifiers)})")
    return cfg.reward


def _assets(cfg) -> Path:
    if cfg.vlm.assets is None:
        raise ValueError("vlm.assets must name the assets directory (model/ + data files)")
    assets = Path(cfg.vlm.assets)
    if (assets / "model" / "config.json").is_file():
        return assets
    if not cfg.vlm.build_demo_assets:
        raise FileNotFoundError(f"{assets / 'model' / 'config.json'} not found; set "
                                f"vlm.build_demo_assets=true to write the digits demo there")
    ready = assets / ".ready"
    if int(os.environ.get("RANK", 0)) == 0:
        from megatron_vlm.data.digits import build_demo_assets

        build_demo_assets(assets, seed=cfg.runtime.seed)
        ready.write_text("ok")
    deadline = time.monotonic() + 600
    while not ready.exists():  # other ranks wait for rank 0 (no process group exists yet)
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not finish writing {assets}")
        time.sleep(0.5)
    return assets


def _build_policy(cfg, runtime, family, hf_config):
    """The policy in `runtime.params_dtype` (megatron's mixed-precision optimizer keeps fp32 master
    weights and Adam state for bf16 params), weights from `vlm.init_from` or seeded random init."""
    from megatron_vlm.checkpoint.sharding import RankLayout, load_full_state_dict
    from megatron_vlm.trainer.megatron_step import build_optimizer, wrap_ddp

    cfg.vlm.check_weights_source()
    # random weights first: the seeded draw comes before the build, as it always has
    full = None if cfg.vlm.init_from else _random_weights(cfg.runtime.seed, family, hf_config)
    model = family.build(hf_config, cfg.parallel, runtime.device.type, cfg.runtime.torch_dtype,
                         backend=cfg.runtime.backend, calculate_per_token_loss=True)
    if full is not None:
        load_full_state_dict(model, full, RankLayout.current(model.config), hf_config.tie_word_embeddings)
    else:
        from megatron_vlm.checkpoint.convert import load_weights

        loaded = load_weights(model, cfg.vlm.init_from, family, hf_config)
        if runtime.rank == 0:
            print(f"weights: {loaded}", flush=True)
    ddp = wrap_ddp(model, cfg.parallel.distributed_optimizer)
    total = sum(stage.steps for stage in cfg.stages) or 1
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.parallel.distributed_optimizer, total)
    return model, ddp, optimizer, scheduler


def _random_weights(seed: int, family, hf_config) -> dict:
    """transformers' initialisation as full megatron tensors, seeded, so identical on every rank
    (the full HF model is built on each: for the demo and tests, never for a real model)."""
    from megatron_vlm.checkpoint.hf_rules import hf_to_mcore

    torch.manual_seed(seed)
    hf_model = family.hf_model_class(hf_config)
    return dict(hf_to_mcore(family.hf_rules(hf_config), hf_model.state_dict().__getitem__))


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = list(range(len(rows)))
    for ax, key, title in zip(axes, ("eval_accuracy", "reward", "loss"),
                              ("held-out accuracy", "GRPO reward", "training loss")):
        points = [(i, r[key]) for i, r in zip(x, rows) if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_accuracy" else None)
        ax.set_title(title)
        ax.set_xlabel("step (all stages)")
        for i, row in enumerate(rows):
            if i and row.get("stage") != rows[i - 1].get("stage"):
                ax.axvline(i, color="grey", linestyle=":")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class _Logger:
    """Metrics as JSON lines and progress lines, from rank 0."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled, self.rows, self.file = enabled, [], None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "metrics.jsonl", "w")

    def __call__(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        keys = ("stage", "step", "loss", "reward", "mixed_group_share", "eval_accuracy",
                "sync_logprob_max_abs", "step_seconds")
        print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                       for k in keys if k in row), flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
