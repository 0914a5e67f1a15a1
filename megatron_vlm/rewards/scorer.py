"""The scoring service: a batch of samples in, per-sample rewards and metrics out.

    scorer = RewardScorer(RewardConfig(verifiers={"gsm8k": "math", "mcq": "choice"}))
    result = scorer.score(samples)     # result.rewards feed the group advantages

Verifiers and user rewards (dotted paths) run in a `WorkerPool` with a hard timeout; tasks whose
verifier is `"reward_model"` are scored in this process by the reward model given to the scorer
(it owns a device). A sample whose reward raises, hangs or dies gets `failure_score`, is listed in
`result.failures` with its id, and is counted in the metrics; the batch always completes. A call
in which more than `max_failure_rate` of the samples fail raises RewardFailureRateError instead:
a verifier that fails on most samples is broken, and training on its failure scores would hide it.

Format rules, per task, on top of the verdict (`extract.format_problem` decides what is well
formed): `strict_format` pays a malformed response 0 whatever its verdict; `format_reward` adds a
bonus to a well-formed one, DeepSeek-R1's format reward (arXiv:2501.12948, 2.2.2). With both, a
malformed answer earns 0, a well-formed wrong one the bonus, a well-formed right one 1 + bonus: the
policy is paid to keep the template on prompts it never saw demonstrated, and paid more for the
answer. `result.verdicts` keeps the verifier's scores before these rules (accuracy is read from
them); `result.raw` is after them (the training signal).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from megatron_vlm.rewards.extract import format_problem
from megatron_vlm.rewards.hacking import HackingMonitor, HackingMonitorConfig, HackingReport
from megatron_vlm.rewards.normalization import RunningStats, normalization_modes, normalize_by_task
from megatron_vlm.rewards.pool import START_METHODS, Job, WorkerPool
from megatron_vlm.rewards.registry import BadReference, registered_verifiers, resolve_reward_fn, validate_sample

REWARD_MODEL = "reward_model"  # the verifier name that routes a task to the reward model
JUDGE = "judge"                # ... and to the judge (a generative verifier, judge.py)
IN_PROCESS = (REWARD_MODEL, JUDGE)
_DOTTED_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(kw_only=True)
class RewardConfig:
    verifiers: dict[str, str]                                # task -> verifier name | "pkg.mod:fn" | "reward_model"
    weights: dict[str, float] = field(default_factory=dict)  # task -> weight after normalisation (default 1)
    timeout_s: float = 10.0      # per sample, enforced by killing the worker
    failure_score: float = 0.0   # reward of a sample whose reward raised, hung or crashed
    num_workers: int = 2
    normalization: str = "none"  # none | mean_std | rank, per task (see normalization.py)
    start_method: str = "forkserver"  # or spawn; never fork (torch thread pools deadlock)
    monitor_tasks: list[str] = field(default_factory=list)  # verifier tasks also scored by the RM, to catch RM hacking
    hacking: HackingMonitorConfig = field(default_factory=HackingMonitorConfig)
    max_failure_rate: float = 0.5  # a score() call with a larger share of failed samples raises; 1 never
    # task -> default metadata for its verifier (a sample's own metadata wins), e.g. a strict
    # short-answer task: {"trivia": {"match": "exact"}}
    task_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    # task -> True: a response that does not follow the think-then-answer template (think block
    # missing, unclosed, junk; see extract.format_problem) scores 0 without being verified. The
    # well-formed share is logged for every task whatever this says (reward/<task>/well_formed).
    strict_format: dict[str, bool] = field(default_factory=dict)
    # task -> bonus in [0, 1) added to a well-formed response's reward (a failed one gets none);
    # below 1 so that a verdict of 1 still marks the correct answers (raw >= 1)
    format_reward: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not self.verifiers:
            raise ValueError(f"reward.verifiers must name at least one task, got {self.verifiers!r}")
        known = set(registered_verifiers()) | set(IN_PROCESS)
        for task, name in self.verifiers.items():
            if name not in known and not _DOTTED_PATH.match(name):
                raise ValueError(f"reward.verifiers[{task!r}] must be one of {sorted(known)} or "
                                 f"'pkg.module:function', got {name!r}")
        for task, weight in self.weights.items():
            if task not in self.verifiers:
                raise ValueError(f"reward.weights has task {task!r} without a verifier; "
                                 f"tasks: {sorted(self.verifiers)}")
            if not weight >= 0:
                raise ValueError(f"reward.weights[{task!r}] must be >= 0, got {weight}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
        if not self.num_workers >= 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {self.num_workers}")
        if self.normalization not in normalization_modes():
            raise ValueError(f"reward.normalization must be one of {normalization_modes()}, "
                             f"got {self.normalization!r}")
        for task in self.monitor_tasks:
            if self.verifiers.get(task, REWARD_MODEL) in IN_PROCESS:
                raise ValueError(f"reward.monitor_tasks has {task!r}, which needs a verifier "
                                 f"other than the reward model")
        if self.start_method not in START_METHODS:
            raise ValueError(f"reward.start_method must be one of {START_METHODS}, got {self.start_method!r}")
        for name in ("strict_format", "format_reward", "task_metadata"):  # per-task settings name real tasks
            for task in getattr(self, name):
                if task not in self.verifiers:
                    raise ValueError(f"reward.{name} names task {task!r}, which has no verifier in "
                                     f"reward.verifiers (tasks: {sorted(self.verifiers)})")
        for task, strict in self.strict_format.items():
            if not isinstance(strict, bool):
                raise ValueError(f"reward.strict_format[{task!r}] must be true or false, got {strict!r}")
        for task, bonus in self.format_reward.items():
            if isinstance(bonus, bool) or not isinstance(bonus, (int, float)) or not 0 <= bonus < 1:
                raise ValueError(f"reward.format_reward[{task!r}] must be a number in [0, 1), got {bonus!r}")
        for task, defaults in self.task_metadata.items():
            if not isinstance(defaults, Mapping):
                raise ValueError(f"reward.task_metadata[{task!r}] must be a mapping, got {defaults!r}")
        if not 0 <= self.max_failure_rate <= 1:
            raise ValueError(f"reward.max_failure_rate must be in [0, 1], got {self.max_failure_rate}")


@dataclass(kw_only=True)
class RewardSample:
    sample_id: Any
    task: str
    prompt: str
    response: str
    reference: Any = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardFailure:
    sample_id: Any
    task: str
    kind: str     # "timeout" | "error" | "bad_reference" | "bad_response"
    message: str
    elapsed_s: float = 0.0  # from the job's start in a worker to its failure (or the kill)


@dataclass
class RewardResult:
    raw: list[float]       # each sample's reward before normalisation, after the format rules (failure_score on failure)
    rewards: list[float]   # normalised per task and weighted: the input to group advantages
    metrics: dict[str, float]
    failures: list[RewardFailure]
    hacking: HackingReport | None = None  # when monitor_tasks are configured
    verdicts: list[float] = field(default_factory=list)     # the verifier's / RM's score, before the format rules
    well_formed: list[bool] = field(default_factory=list)   # extract.format_problem found nothing wrong

    def __post_init__(self):
        self.verdicts = self.verdicts or list(self.raw)  # a result built without format rules


class RewardFailureRateError(ValueError):
    """More than `reward.max_failure_rate` of one score() call's samples failed (raised, hung,
    crashed); the message names the task with the most failures, the rate and the first messages."""

    def __init__(self, failures: Sequence[RewardFailure], samples: Sequence[RewardSample], max_rate: float):
        per_task: dict[str, list[int]] = {}  # task -> [failures, samples]
        for s in samples:
            per_task.setdefault(s.task, [0, 0])[1] += 1
        for f in failures:
            per_task[f.task][0] += 1
        worst = max(per_task, key=lambda t: (per_task[t][0], per_task[t][0] / per_task[t][1]))
        failed, total = per_task[worst]
        first = "; ".join(f"{f.sample_id} ({f.task}, {f.kind}): {f.message}" for f in failures[:3])
        super().__init__(f"{len(failures)} of {len(samples)} samples failed to score "
                         f"({len(failures) / len(samples):.0%} > reward.max_failure_rate={max_rate:g}); "
                         f"worst task {worst!r}: {failed} of {total} failed "
                         f"({sum(f.kind == 'timeout' for f in failures if f.task == worst)} timeouts); "
                         f"first failures: {first}")
        self.failures, self.task, self.rate = list(failures), worst, len(failures) / len(samples)


class RewardModel(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str],
              references: Sequence[Any] | None = None) -> list[float]: ...


class Judge(Protocol):
    def judge(self, questions: Sequence[str], references: Sequence[Any], responses: Sequence[str]) -> list: ...


class RewardScorer:
    def __init__(self, cfg: RewardConfig, reward_model: RewardModel | None = None, judge: Judge | None = None):
        specs = sorted({name for name in cfg.verifiers.values() if name not in IN_PROCESS})
        for spec in specs:  # fail at start-up, not mid-run, on a bad name or import path
            resolve_reward_fn(spec)
        if (REWARD_MODEL in cfg.verifiers.values() or cfg.monitor_tasks) and reward_model is None:
            raise ValueError("reward.verifiers or reward.monitor_tasks need a reward model, but none was given")
        if JUDGE in cfg.verifiers.values() and judge is None:
            raise ValueError("reward.verifiers name the judge, but no judge was given")
        self.cfg, self.reward_model, self.judge = cfg, reward_model, judge
        self.stats: dict[str, RunningStats] = {}
        self.monitor = HackingMonitor(cfg.hacking) if cfg.monitor_tasks else None
        self.pool = WorkerPool(cfg.num_workers, start_method=cfg.start_method, warm_specs=specs)

    def score(self, samples: Sequence[RewardSample]) -> RewardResult:
        unknown = sorted({s.task for s in samples} - set(self.cfg.verifiers))
        if unknown:
            raise KeyError(f"samples have tasks {unknown} without a verifier; configured: {sorted(self.cfg.verifiers)}")
        verdicts: list[float] = [self.cfg.failure_score] * len(samples)
        rejected = {i: f for i, f in ((i, self._reject(s)) for i, s in enumerate(samples)) if f is not None}
        well_formed = [isinstance(s.response, str) and format_problem(s.response) is None for s in samples]
        kept = [i for i in range(len(samples)) if i not in rejected]
        failed = dict(rejected)
        for scorer in (self._score_with_pool, self._score_with_reward_model, self._score_with_judge):
            failed.update(scorer(samples, verdicts, kept))
        failures = list(failed.values())  # the rejected first, then each scorer's
        if samples and len(failures) > self.cfg.max_failure_rate * len(samples):
            raise RewardFailureRateError(failures, samples, self.cfg.max_failure_rate)
        refused = {i for i in kept if self.cfg.strict_format.get(samples[i].task) and not well_formed[i]}
        raw = [0.0 if i in refused else verdict + (self.cfg.format_reward.get(samples[i].task, 0.0)
                                                   if well_formed[i] and i not in failed else 0.0)
               for i, verdict in enumerate(verdicts)]
        rewards, self.stats = normalize_by_task(raw, [s.task for s in samples], self.cfg.normalization,
                                                self.cfg.weights, self.stats)
        metrics = task_metrics(samples, raw, rewards, failures, well_formed, refused, verdicts)
        hacking = self._monitor(samples, raw, failures)
        if hacking is not None:
            metrics.update(hacking.metrics)
        return RewardResult(raw, rewards, metrics, failures, hacking, verdicts, well_formed)

    def _monitor(self, samples: Sequence[RewardSample], raw: Sequence[float],
                 failures: Sequence[RewardFailure]) -> HackingReport | None:
        """Score verified samples of `monitor_tasks` with the RM too and compare (not rewarded)."""
        failed = {(f.sample_id, f.task) for f in failures}
        indices = [i for i, s in enumerate(samples)
                   if s.task in self.cfg.monitor_tasks and (s.sample_id, s.task) not in failed]
        if self.monitor is None or not indices:
            return None
        try:
            rm_scores = self.reward_model.score([samples[i].prompt for i in indices],
                                                [samples[i].response for i in indices],
                                                [samples[i].reference for i in indices])
        except Exception:  # monitoring must not stop the run; the RM task path reports RM errors
            return None
        return self.monitor.update([samples[i].sample_id for i in indices], rm_scores, [raw[i] for i in indices])

    def _score_with_pool(self, samples: Sequence[RewardSample], raw: list[float],
                         kept: Sequence[int]) -> dict[int, RewardFailure]:
        indices = [i for i in kept if self.cfg.verifiers[samples[i].task] not in IN_PROCESS]
        jobs = [Job(self.cfg.verifiers[samples[i].task],
                    (samples[i].response, samples[i].reference, self.metadata(samples[i]))) for i in indices]
        failures = {}
        for i, result in zip(indices, self.pool.run(jobs, self.cfg.timeout_s)):
            if result.value is not None:
                raw[i] = result.value
            else:
                error = result.error or ""
                kind = ("timeout" if result.timed_out else
                        "bad_reference" if error.startswith(f"{BadReference.__name__}:") else "error")
                failures[i] = RewardFailure(samples[i].sample_id, samples[i].task, kind, error, result.elapsed_s)
        return failures

    def _reject(self, sample: RewardSample) -> RewardFailure | None:
        """A failure for a sample that cannot be scored at all (checked here, not in a worker)."""
        if not isinstance(sample.response, str):
            return RewardFailure(sample.sample_id, sample.task, "bad_response",
                                 f"sample {sample.sample_id!r} (task {sample.task!r}): response must be a str, "
                                 f"got {type(sample.response).__name__}")
        try:
            validate_sample(self.cfg.verifiers[sample.task], sample.reference, self.metadata(sample))
        except BadReference as e:
            return RewardFailure(sample.sample_id, sample.task, "bad_reference", str(e))
        return None

    def check_samples(self, samples: Sequence[RewardSample]) -> None:
        """Load-time check: see `validate_samples`."""
        validate_samples(self.cfg, samples)

    def metadata(self, sample: RewardSample) -> dict[str, Any]:
        """The metadata its verifier sees: the task's defaults, overridden by the sample's own."""
        return {**self.cfg.task_metadata.get(sample.task, {}), **sample.metadata}

    def _score_with_reward_model(self, samples: Sequence[RewardSample], raw: list[float],
                                 kept: Sequence[int]) -> dict[int, RewardFailure]:
        indices = [i for i in kept if self.cfg.verifiers[samples[i].task] == REWARD_MODEL]
        if not indices:
            return {}
        try:
            scores = self.reward_model.score([samples[i].prompt for i in indices],
                                             [samples[i].response for i in indices],
                                             [samples[i].reference for i in indices])
        except Exception as e:  # the run goes on; every sample of the call is reported
            message = f"reward model failed: {type(e).__name__}: {e}"
            return {i: RewardFailure(samples[i].sample_id, samples[i].task, "error", message) for i in indices}
        for i, value in zip(indices, scores):
            raw[i] = float(value)
        return {}

    def _score_with_judge(self, samples: Sequence[RewardSample], raw: list[float],
                          kept: Sequence[int]) -> dict[int, RewardFailure]:
        indices = [i for i in kept if self.cfg.verifiers[samples[i].task] == JUDGE]
        if not indices:
            return {}
        try:
            verdicts = self.judge.judge([samples[i].prompt for i in indices], [samples[i].reference for i in indices],
                                        [samples[i].response for i in indices])
        except Exception as e:  # the run goes on; every sample of the call is reported
            message = f"judge failed: {type(e).__name__}: {e}"
            return {i: RewardFailure(samples[i].sample_id, samples[i].task, "error", message) for i in indices}
        failures = {}
        for i, verdict in zip(indices, verdicts):
            if verdict.score is not None:
                raw[i] = verdict.score
            else:
                failures[i] = RewardFailure(samples[i].sample_id, samples[i].task,
                                            "timeout" if verdict.timed_out else "error", verdict.error or "",
                                            verdict.elapsed_s)
        return failures

    def state_dict(self) -> dict[str, Any]:
        return {task: vars(stats).copy() for task, stats in self.stats.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stats = {task: RunningStats(**values) for task, values in state.items()}

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def validate_samples(cfg: RewardConfig, samples: Sequence[RewardSample]) -> None:
    """Raise `BadReference` naming every sample (up to ten) whose task has no verifier, whose
    response is not a string, or whose reference / metadata its verifier refuses (e.g. an
    instruction-following sample with no constraints). Cheap, no workers: call it when a dataset
    is loaded, so that a bad sample stops the run before its first step."""
    problems = []
    for sample in samples:
        if sample.task not in cfg.verifiers:
            problems.append(f"sample {sample.sample_id!r}: task {sample.task!r} has no verifier")
            continue
        if not isinstance(sample.response, (str, type(None))):  # a dataset sample has no response yet
            problems.append(f"sample {sample.sample_id!r}: response must be a str, got {type(sample.response).__name__}")
        try:
            validate_sample(cfg.verifiers[sample.task], sample.reference,
                            {**cfg.task_metadata.get(sample.task, {}), **sample.metadata})
        except BadReference as e:
            problems.append(f"sample {sample.sample_id!r} (task {sample.task!r}): {e}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise BadReference(f"{len(problems)} of {len(samples)} samples cannot be scored: "
                           + "; ".join(problems[:10]) + more)


def task_metrics(samples: Sequence[RewardSample], raw: Sequence[float], rewards: Sequence[float],
                 failures: Sequence[RewardFailure], well_formed: Sequence[bool] | None = None,
                 refused: set[int] = frozenset(), verdicts: Sequence[float] | None = None) -> dict[str, float]:
    """Per task: raw mean, normalised mean, share of non-zero rewards (sparsity), failures, share
    of well-formed responses, the number refused for their format (strict_format) and the mean
    verdict before the format rules."""
    well_formed = [True] * len(samples) if well_formed is None else well_formed
    verdicts = raw if verdicts is None else verdicts
    metrics: dict[str, float] = {"reward/failures": float(len(failures)),
                                 "reward/timeouts": float(sum(f.kind == "timeout" for f in failures)),
                                 "reward/bad_references": float(sum(f.kind == "bad_reference" for f in failures))}
    if samples:
        metrics["reward/well_formed"] = sum(well_formed) / len(samples)
    for task in dict.fromkeys(s.task for s in samples):
        indices = [i for i, s in enumerate(samples) if s.task == task]
        n = len(indices)
        metrics[f"reward/{task}/count"] = float(n)
        metrics[f"reward/{task}/raw_mean"] = sum(raw[i] for i in indices) / n
        metrics[f"reward/{task}/mean"] = sum(rewards[i] for i in indices) / n
        metrics[f"reward/{task}/nonzero_frac"] = sum(raw[i] != 0 for i in indices) / n
        metrics[f"reward/{task}/failures"] = float(sum(f.task == task for f in failures))
        metrics[f"reward/{task}/timeouts"] = float(sum(f.task == task and f.kind == "timeout" for f in failures))
        metrics[f"reward/{task}/bad_references"] = float(
            sum(f.task == task and f.kind == "bad_reference" for f in failures))
        metrics[f"reward/{task}/well_formed"] = sum(well_formed[i] for i in indices) / n
        metrics[f"reward/{task}/format_refused"] = float(sum(i in refused for i in indices))
        metrics[f"reward/{task}/verdict_mean"] = sum(verdicts[i] for i in indices) / n
    return metrics
