"""RunConfig: one run's configuration, made of the small dataclasses that live next to their code.

A recipe in configs/*.yaml overrides only what differs from the defaults (or, with `base:
file.yaml`, from another recipe); `key.sub=value` on the
command line overrides the recipe (values are parsed as YAML: `parallel.tp=2`, `model.dense_layers=[0]`).
Unknown keys are errors that name the full key and list the known ones, so a typo never silently
falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_vlm.data.loading import KindsConfig, LoadConfig, SourceConfig
from megatron_vlm.models.language import LanguageModelConfig
from megatron_vlm.models.specs import BackendConfig
from megatron_vlm.parallel.config import ParallelConfig
from megatron_vlm.parallel.plan import PlannedModel
from megatron_vlm.rewards.judge import JudgeConfig
from megatron_vlm.rewards.reward_model import RewardModelConfig
from megatron_vlm.rewards.scorer import RewardConfig
from megatron_vlm.rl.config import RLConfig, RolloutConfig, UpdateConfig
from megatron_vlm.rl.preference import PreferenceConfig
from megatron_vlm.rl.rejection import RejectionConfig


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0     # 0 disables clipping
    warmup_steps: int = 0
    decay_style: str = "constant"  # megatron OptimizerParamScheduler styles: constant|linear|cosine

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.decay_style must be constant|linear|cosine, "
                             f"got {self.decay_style!r}")


PREFERENCE_KINDS = ("dpo", "mpo")
STAGE_KINDS = ("sft", "grpo", "rft") + PREFERENCE_KINDS


@dataclass(kw_only=True)
class StageConfig:
    kind: str                 # sft | grpo | rft (rejection-sampling fine-tuning) | dpo | mpo
    steps: int
    batch_size: int = 32      # sft: labelled examples per step (grpo uses rollout.prompts_per_step)
    lr: float | None = None   # a constant rate for this stage; None: optim's schedule continues
    reset_optimizer: bool = False  # start the stage with fresh Adam moments (RL after SFT)
    eval_every: int | None = None  # this stage's evaluation cadence; None: eval.every (each stage
                                   # also evaluates at its end)

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stages[].kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"stages[] {self.kind}: eval_every must be >= 1 or null, got {self.eval_every}")
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
                                     # with assets/model (models/source.py)
    sft_data: str = "sft.parquet"
    prompt_data: str = "rl.parquet"
    eval_data: str = "eval.parquet"
    preference_data: str = "pref.parquet"  # dpo / mpo stages: prompt, chosen, rejected
    prompt_sources: list[SourceConfig] | None = None  # instead of prompt_data: a mixture by ratio
    load: LoadConfig = field(default_factory=LoadConfig)  # transforms (MCQ -> fill-in, question
                                                          # into the image), template, length rules
    max_prompt_length: int = 256     # the loader's limit (expanded tokens): one place to set it
    kinds: KindsConfig = field(default_factory=KindsConfig)  # the kinds each split keeps: {sft, rl,
                                     # eval: [names] | null, column: kind} (demonstrations of some kinds)
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
    slice_by: list[str] = field(default_factory=list)  # columns whose values split each kind's accuracy
                                                       # (the digits demo: larger = left / right / equal)

    def __post_init__(self):
        if self.every < 1 or self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.every, eval.samples and eval.max_new_tokens must be >= 1")
        if not all(isinstance(c, str) and c for c in self.slice_by):
            raise ValueError(f"eval.slice_by must list column names, got {self.slice_by!r}")


@dataclass(kw_only=True)
class RuntimeConfig:
    device: str | None = None   # None: cuda when available, else cpu
    seed: int = 1234
    nproc: int = 1              # local ranks `megatron-vlm train` starts itself (CPU / one node)
    nodes: int = 1              # cluster size, for `plan` and the SLURM script
    gpus_per_node: int = 8
    params_dtype: str = "float32"  # float32 | bfloat16
    backend: BackendConfig = field(default_factory=BackendConfig)  # layer spec, MoE grouped GEMM
                                   # and permute fusion; defaults per device (models/specs.py)

    def __post_init__(self):
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"runtime.device must be cpu, cuda or null, got {self.device!r}")
        for name in ("nproc", "nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"runtime.{name} must be >= 1, got {getattr(self, name)}")
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"runtime.params_dtype must be float32 or bfloat16, "
                             f"got {self.params_dtype!r}")

    @property
    def torch_dtype(self):
        """params_dtype as a torch dtype: what every module that builds parameters is given."""
        import torch

        return getattr(torch, self.params_dtype)


LOGGERS = ("jsonl", "tensorboard", "wandb")  # train.loggers (jsonl is always on)


@dataclass(kw_only=True)
class SamplesConfig:
    """`train.samples`: which rollouts are written for reading."""
    every: int | None = None   # steps of a GRPO / RFT stage between writes; None: none written
    count: int = 16            # rollouts per write (a seeded draw of the step's samples)

    def __post_init__(self):
        if self.every is not None and self.every < 1:
            raise ValueError(f"train.samples.every must be >= 1 or null, got {self.every}")
        if self.count < 1:
            raise ValueError(f"train.samples.count must be >= 1, got {self.count}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """`train.checkpoint`: when a VLM run saves its state (trainer/checkpointing.py)."""
    every: int | None = None   # steps of a stage between saves; None: only at the end of each stage
    keep: int = 2              # the newest checkpoints kept (older ones are deleted after a save)

    def __post_init__(self):
        if self.every is not None and self.every < 1:
            raise ValueError(f"train.checkpoint.every must be >= 1 or null, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"train.checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100
    seq_length: int = 64
    micro_batch_size: int = 4
    global_batch_size: int = 16
    log_every: int = 10
    eval_every: int = 50
    out_dir: str = "runs/lm"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # VLM runs
    save_by: float | str | None = None  # time budget: seconds from the start or an ISO-8601 time by
                                        # which the run saves and exits 75; None: the SLURM job's end
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard, wandb (trainer/loggers.py)
    wandb_project: str = "megatron_vlm"
    samples: SamplesConfig = field(default_factory=SamplesConfig)  # rollouts to read (trainer/samples.py)

    def __post_init__(self):
        for name in ("steps", "seq_length", "micro_batch_size", "global_batch_size", "log_every",
                     "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        unknown = sorted(set(self.loggers) - set(LOGGERS))
        if unknown:
            raise ValueError(f"train.loggers: unknown {unknown}; known: {list(LOGGERS)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) must be a "
                             f"multiple of train.micro_batch_size ({self.micro_batch_size})")


@dataclass(kw_only=True)
class DataConfig:
    task: str = "arithmetic"    # generated data: "arithmetic" (a+b=c, char-level)
    max_operand: int = 99
    eval_samples: int = 64

    def __post_init__(self):
        if self.task not in ("arithmetic",):
            raise ValueError(f"data.task must be one of ['arithmetic'], got {self.task!r}")
        if self.max_operand < 1:
            raise ValueError(f"data.max_operand must be >= 1, got {self.max_operand}")


@dataclass(kw_only=True)
class RunConfig:
    model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # VLM post-training (used when vlm.assets is set; the sections above still apply)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    stages: list[StageConfig] = field(default_factory=list)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig | None = None  # None: every task of the data scored by vlm.verifier
    reward_model: RewardModelConfig | None = None  # for tasks whose verifier is "reward_model"
    judge: JudgeConfig | None = None  # for tasks whose verifier is "judge" (a local HF causal LM grades)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # dpo / mpo stages (name
                                                                            # set by the stage kind)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)  # rft stages: best-of-N filter

    def __post_init__(self):
        sampled = self.rollout.temperature
        if sampled > 0 and self.update.temperature != sampled:
            raise ValueError(
                f"update.temperature ({self.update.temperature}) must equal rollout.temperature ({sampled}): "
                f"the trainer scores the sampled tokens at update.temperature, and only at the engine's "
                f"temperature is that the distribution they were drawn from (the weight-sync check and "
                f"the policy ratio compare the two); set update.temperature={sampled} or leave it unset")

    @property
    def is_vlm(self) -> bool:
        return self.vlm.assets is not None

    def world_size(self) -> int:
        return self.runtime.nproc if self.runtime.nproc > 1 else (
            self.runtime.nodes * self.runtime.gpus_per_node if self.runtime.nodes > 1 else 1)

    def planned_model(self) -> PlannedModel:
        """The model this run builds: `model:` for the LM trainer; for a VLM run the HF config it
        reads (models/source.py), vision tower included. The `model:` section is unused then."""
        if not self.is_vlm:
            return PlannedModel(self.model)
        from megatron_vlm.models import family_for
        from megatron_vlm.models.qwen_vl import HF_TEXT_FIELDS
        from megatron_vlm.models.source import resolve_hf_config

        hf_config, source = resolve_hf_config(self.vlm)
        family = family_for(hf_config)
        names = {ours: f"text_config.{theirs}" for ours, theirs in HF_TEXT_FIELDS.items()}
        return PlannedModel(family.language_config(hf_config), family.vision_parameters(hf_config),
                            source, names)

    def check(self, world_size: int, planned: PlannedModel | None = None) -> None:
        """Every layout error, before any process group is created (`planned`: planned_model());
        a VLM run must also say where its weights come from."""
        if self.is_vlm:
            self.vlm.check_weights_source()
        (planned or self.planned_model()).check_layout(self.parallel)
        if self.is_vlm and self.model != LanguageModelConfig():
            raise ValueError("a model: section is read by the LM trainer only; a VLM run builds the "
                             "model of its HF config (vlm.assets/model, vlm.model_config): drop it")
        if self.is_vlm:
            self.parallel.data_parallel_size(world_size)
            if not self.stages:
                raise ValueError("a VLM run needs at least one entry in stages (kind: sft | grpo | rft | dpo | mpo)")
            return
        self.parallel.data_parallel_size(world_size)
        if self.parallel.cp > 1 and self.train.seq_length % (2 * self.parallel.cp):
            raise ValueError(f"train.seq_length ({self.train.seq_length}) must be divisible by "
                             f"2 * parallel.cp ({2 * self.parallel.cp}) for context parallelism")
        dp = self.parallel.data_parallel_size(world_size)
        if self.train.global_batch_size % (self.train.micro_batch_size * dp):
            raise ValueError(f"train.global_batch_size ({self.train.global_batch_size}) must be a "
                             f"multiple of train.micro_batch_size x DP "
                             f"({self.train.micro_batch_size} x {dp})")


def parse_overrides(items: list[str]) -> dict:
    """['a.b=1', 'c=[0, 1]'] -> {'a': {'b': 1}, 'c': [0, 1]}."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from nested dicts, rejecting unknown keys by their full name and values
    of the wrong type by their full path (`stages[0].steps: expected int, got 2.5`)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, "
                         f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown config key '{prefix}{unknown[0]}' (known under "
                         f"'{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(known))})")
    kwargs = {name: _typed_value(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'}: {exc}") from None


class _TypeMismatch(ValueError):
    """A config value whose type is not its field's annotation; `key` is the full path."""

    def __init__(self, key: str, hint, value):
        shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
        hint_text = ""
        if float in (hint, *typing.get_args(hint)) and isinstance(value, str) and _parses_as_float(value):
            hint_text = " (YAML reads a number without a dot as a string: write e.g. 1.0e-6)"
        super().__init__(f"{key}: expected {_type_name(hint)}, got {shown}{hint_text}")
        self.key = key


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(hint) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return str(hint).replace("typing.", "")


def _typed_value(hint, value, key: str):
    """`value` checked against annotation `hint`, converted where that loses nothing (an int for a
    float field becomes a float); a dataclass recurses through from_dict. bool is not an int here:
    YAML `true` for an int field is a mistake. Annotations this does not know pass through."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        return _union_value(hint, args, value, key)
    if origin is typing.Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise _TypeMismatch(key, hint, value)
        return value
    if origin in (list, dict):
        return _container_value(hint, origin, args, value, key)
    scalar_ok = {bool: type(value) is bool,
                 int: isinstance(value, int) and not isinstance(value, bool),
                 float: isinstance(value, (int, float)) and not isinstance(value, bool),
                 str: isinstance(value, str),
                 list: isinstance(value, (list, tuple)),
                 dict: isinstance(value, dict)}
    if hint in scalar_ok and not scalar_ok[hint]:
        raise _TypeMismatch(key, hint, value)
    return float(value) if hint is float else value


def _union_value(hint, args, value, key: str):
    """`X | None` takes None or an X; a wider union takes the first member that fits. When no member
    fits, the error of a member whose container matched (list for `list[str]`) names the bad item."""
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        try:
            return _typed_value(members[0], value, key)
        except _TypeMismatch as exc:
            raise exc if exc.key != key else _TypeMismatch(key, hint, value) from None
    inner = None
    for member in members:
        try:
            return _typed_value(member, value, key)
        except _TypeMismatch as exc:
            inner = exc if exc.key != key else inner
    raise inner or _TypeMismatch(key, hint, value)


def _container_value(hint, origin, args, value, key: str):
    """list[X] checks every item (`key[2]`), dict[K, V] every key and value (`key.name`)."""
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(key, hint, value)
        return [_typed_value(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if not isinstance(value, dict):
        raise _TypeMismatch(key, hint, value)
    if not args:
        return value
    key_hint, value_hint = args
    return {_typed_value(key_hint, k, f"{key} key {k!r}"): _typed_value(value_hint, v, f"{key}.{k}")
            for k, v in value.items()}


def read_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A YAML recipe as a dict; `base: other.yaml` (relative to this file) is read first and this
    file's keys are merged over it, so a recipe states only what differs from its base."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ValueError(f"config {path}: base chain loops ({' -> '.join(map(str, seen))})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return merge(read_recipe(path.parent / base, seen + (path.resolve(),)), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = read_recipe(Path(path)) if path is not None else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(RunConfig, follow_rollout_temperature(data))


def follow_rollout_temperature(data: dict) -> dict:
    """An `update:` without a temperature scores at the rollout's sampling temperature (verl's
    actor does the same); one that names another is refused by RunConfig."""
    rollout, update = data.get("rollout"), data.get("update")
    update = {} if update is None else update
    if not isinstance(rollout, dict) or not isinstance(update, dict) or "temperature" in update:
        return data  # nothing to follow, or a broken section from_dict names
    sampled = rollout.get("temperature")
    if isinstance(sampled, bool) or not isinstance(sampled, (int, float)) or sampled <= 0:
        return data  # greedy (or a bad value from_dict names): update keeps its default
    return {**data, "update": {**update, "temperature": sampled}}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
