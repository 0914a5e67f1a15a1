"""The scoring service on a real worker pool: hanging, raising and crashing rewards, timeouts
measured against their setting, metrics with sample ids, and the run going on afterwards.

One scorer (two forkserver workers) is shared by the module: worker start-up is the slow part.
"""
import time
from dataclasses import replace

import pytest

from megatron_vlm.rewards import RewardConfig, RewardSample, RewardScorer
from megatron_vlm.rewards.hacking import HackingMonitorConfig
from megatron_vlm.rewards.pool import Job, WorkerPool
from megatron_vlm.rewards.scorer import RewardFailureRateError

from . import user_rewards

USER = user_rewards.__name__
TIMEOUT_S = 1.0
FAILURE_SCORE = -1.0
HANGING_MATH = "\\boxed{10^{10^{10^{10}}}}"  # math-verify's verify never returns on this
HANGING_FORMULA = "(x+1)^(2^20)"             # sympy's simplify runs for minutes on this


@pytest.fixture(scope="module")
def scorer():
    cfg = RewardConfig(
        verifiers={"math": "math", "mcq": "choice", "formula": "formula", "exact": f"{USER}:exact_match",
                   "hang": f"{USER}:hangs", "raise": f"{USER}:raises",
                   "base_exception": f"{USER}:raises_base_exception", "crash": f"{USER}:exits",
                   "nan": f"{USER}:returns_nan", "sleep": f"{USER}:sleeps",
                   "torch": f"{USER}:torch_imported"},
        timeout_s=TIMEOUT_S, failure_score=FAILURE_SCORE, num_workers=2,
        max_failure_rate=1.0)  # these tests study the failures; the rate limit has its own tests
    with RewardScorer(cfg) as s:
        # wait for both workers and their first math-verify call once, here
        warm = s.score([sample(f"warm-{i}", "math", "\\boxed{1}", "1") for i in range(4)])
        assert warm.failures == [], warm.failures
        yield s


def sample(sample_id, task, response, reference=None, **metadata):
    return RewardSample(sample_id=sample_id, task=task, prompt="p", response=response,
                        reference=reference, metadata=metadata)


def test_hanging_raising_and_crashing_rewards_do_not_stop_the_batch(scorer):
    batch = [
        sample("ok-math", "math", "\\boxed{4}", "4"),
        sample("hang-user", "hang", "x"),
        sample("ok-mcq", "mcq", "The answer is (B).", "B"),
        sample("raise", "raise", "x"),
        sample("base-exception", "base_exception", "x"),
        sample("hang-math", "math", HANGING_MATH, "2"),
        sample("crash", "crash", "x"),
        sample("nan", "nan", "x"),
        sample("ok-exact", "exact", "yes", "yes"),
        sample("wrong-math", "math", "\\boxed{5}", "4"),
    ]
    start = time.monotonic()
    result = scorer.score(batch)
    wall_s = time.monotonic() - start

    by_id = dict(zip([s.sample_id for s in batch], result.raw))
    assert [by_id[i] for i in ("ok-math", "ok-mcq", "ok-exact", "wrong-math")] == [1.0, 1.0, 1.0, 0.0], result.failures
    failed = {f.sample_id: f for f in result.failures}
    assert set(failed) == {"hang-user", "raise", "base-exception", "hang-math", "crash", "nan"}
    assert all(by_id[i] == FAILURE_SCORE for i in failed)
    assert {i for i, f in failed.items() if f.kind == "timeout"} == {"hang-user", "hang-math"}
    assert "RuntimeError: user reward failed" in failed["raise"].message
    assert "_NotAnException" in failed["base-exception"].message  # a BaseException is caught too
    assert "worker died (exit code 3)" in failed["crash"].message
    assert "non-finite" in failed["nan"].message
    # the timeout holds within 2x its setting, per sample and for the whole batch (two workers,
    # two hangs: they run side by side)
    for i in ("hang-user", "hang-math"):
        assert TIMEOUT_S <= failed[i].elapsed_s < 2 * TIMEOUT_S, failed[i]
    assert wall_s < 2 * TIMEOUT_S, wall_s
    print(f"\nbatch of 10 with 2 hangs: {wall_s:.3f} s; hang elapsed "
          f"{failed['hang-user'].elapsed_s:.3f} s / {failed['hang-math'].elapsed_s:.3f} s (timeout {TIMEOUT_S} s)")

    assert result.metrics["reward/failures"] == 6.0
    assert result.metrics["reward/timeouts"] == 2.0
    assert result.metrics["reward/math/failures"] == 1.0
    assert result.metrics["reward/math/timeouts"] == 1.0
    assert result.metrics["reward/math/raw_mean"] == pytest.approx((1.0 + FAILURE_SCORE + 0.0) / 3)


def test_hanging_formula_is_killed_and_the_next_formula_scored(scorer):
    start = time.monotonic()
    result = scorer.score([sample("slow", "formula", HANGING_FORMULA, "x"),
                           sample("fast", "formula", "\\boxed{x^2+2x+1}", "(x+1)^2")])
    wall_s = time.monotonic() - start
    assert result.raw == [FAILURE_SCORE, 1.0]
    assert [(f.sample_id, f.kind) for f in result.failures] == [("slow", "timeout")]
    assert TIMEOUT_S <= result.failures[0].elapsed_s < 2 * TIMEOUT_S and wall_s < 2 * TIMEOUT_S


def test_the_run_continues_after_workers_were_killed(scorer):
    restarts = scorer.pool.restarts
    result = scorer.score([sample(i, "exact", "a", "a") for i in range(6)])
    assert result.raw == [1.0] * 6 and result.failures == []
    assert scorer.pool.restarts == restarts  # nothing killed this time


@pytest.mark.parametrize("seconds, timed_out", [(0.3, False), (30.0, True)])
def test_timeout_is_measured_from_the_start_of_the_job(scorer, seconds, timed_out):
    # four slow samples on two workers: the ones that wait for a worker are not charged for it
    batch = [sample(f"sleep-{i}", "sleep", "x", seconds=seconds) for i in range(4)]
    start = time.monotonic()
    result = scorer.score(batch)
    wall_s = time.monotonic() - start
    if timed_out:
        assert [f.kind for f in result.failures] == ["timeout"] * 4
        assert all(TIMEOUT_S <= f.elapsed_s < 2 * TIMEOUT_S for f in result.failures)
        assert wall_s < 2 * 2 * TIMEOUT_S  # two rounds of two
    else:
        assert result.failures == [] and result.raw == [1.0] * 4


def test_workers_do_not_import_torch(scorer):
    # the trainer process has torch loaded; workers started by forkserver or spawn do not inherit it
    assert scorer.score([sample("t", "torch", "x")]).raw == [0.0]


def test_unknown_task_is_an_error_naming_the_configured_ones(scorer):
    with pytest.raises(KeyError, match="without a verifier"):
        scorer.score([sample("x", "essay", "x")])


def test_spawn_pool_kills_and_replaces_a_hung_worker():
    with WorkerPool(1, start_method="spawn", warm_specs=[f"{USER}:exact_match"]) as pool:
        jobs = [Job(f"{USER}:hangs", ("x", None, {})), Job(f"{USER}:exact_match", ("a", "a", {}))]
        results = pool.run(jobs, timeout_s=0.5)
        assert results[0].timed_out and 0.5 <= results[0].elapsed_s < 1.0
        assert results[1].value == 1.0
        assert pool.restarts == 1


class FakeRewardModel:
    def __init__(self, fail=False):
        self.fail, self.calls = fail, []

    def score(self, prompts, responses, references=None):
        self.calls.append(list(responses))
        if self.fail:
            raise RuntimeError("CUDA out of memory")
        return [float(len(r)) for r in responses]


def test_reward_model_tasks_are_scored_in_process_and_its_failures_reported():
    cfg = RewardConfig(verifiers={"chat": "reward_model", "mcq": "choice"}, num_workers=1,
                       weights={"chat": 0.5})
    with RewardScorer(cfg, reward_model=FakeRewardModel()) as s:
        result = s.score([sample(0, "chat", "abc"), sample(1, "mcq", "B", "B"), sample(2, "chat", "abcdef")])
        assert result.raw == [3.0, 1.0, 6.0]
        assert result.rewards == [1.5, 1.0, 3.0]
        s.reward_model = FakeRewardModel(fail=True)
        result = s.score([sample(0, "chat", "abc"), sample(1, "mcq", "B", "B")])
        assert [f.sample_id for f in result.failures] == [0] and result.raw == [0.0, 1.0]
    with pytest.raises(ValueError, match="need a reward model, but none was given"):
        RewardScorer(cfg)


def test_monitor_tasks_compare_the_reward_model_with_the_verifier():
    cfg = RewardConfig(verifiers={"mcq": "choice"}, num_workers=1, monitor_tasks=["mcq"],
                       hacking=HackingMonitorConfig(window=16, min_samples=4))
    # the fake RM scores by length: long wrong answers outscore the short right ones
    batch = [sample(f"right-{i}", "mcq", "B", "B") for i in range(3)] + \
            [sample(f"long-wrong-{i}", "mcq", "The answer is C, for many reasons.", "B") for i in range(3)]
    with RewardScorer(cfg, reward_model=FakeRewardModel()) as s:
        result = s.score(batch)
    assert result.raw == [1.0] * 3 + [0.0] * 3  # the RM does not change the reward
    assert result.hacking.flagged and result.metrics["hacking/flagged"] == 1.0
    assert result.hacking.suspicious_ids == [f"long-wrong-{i}" for i in range(3)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(verifiers={}), "reward.verifiers must name at least one task"),
    (dict(verifiers={"t": "maths"}), "reward.verifiers\\['t'\\] must be one of"),
    (dict(verifiers={"t": "math"}, weights={"u": 1.0}), "reward.weights has task 'u'"),
    (dict(verifiers={"t": "math"}, weights={"t": -1.0}), "reward.weights\\['t'\\] must be >= 0, got -1.0"),
    (dict(verifiers={"t": "math"}, timeout_s=0), "reward.timeout_s must be > 0, got 0"),
    (dict(verifiers={"t": "math"}, num_workers=0), "reward.num_workers must be >= 1, got 0"),
    (dict(verifiers={"t": "math"}, normalization="zscore"), "reward.normalization must be one of"),
    (dict(verifiers={"t": "math"}, start_method="fork"), "reward.start_method must be one of"),
    (dict(verifiers={"t": "reward_model"}, monitor_tasks=["t"]), "reward.monitor_tasks has 't'"),
    (dict(verifiers={"t": "math"}, max_failure_rate=1.5), "reward.max_failure_rate must be in \\[0, 1\\], got 1.5"),
    (dict(verifiers={"t": "math"}, max_failure_rate=-0.1), "reward.max_failure_rate must be in \\[0, 1\\]"),
])
def test_config_errors_name_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_bad_user_reward_fails_at_startup_not_mid_run():
    with pytest.raises(TypeError, match="must accept"):
        RewardScorer(RewardConfig(verifiers={"t": f"{USER}:wrong_signature"}))


def _limited(scorer, monkeypatch, max_failure_rate):
    """The shared scorer (its warm workers) with a failure-rate limit and the `flaky` task."""
    cfg = replace(scorer.cfg, max_failure_rate=max_failure_rate,
                  verifiers={**scorer.cfg.verifiers, "flaky": f"{USER}:raises_unless_ok"})
    monkeypatch.setattr(scorer, "cfg", cfg)
    return scorer


def test_a_reward_failing_on_most_samples_stops_the_call(scorer, monkeypatch):
    batch = [sample("good", "flaky", "ok")] + [sample(f"bad-{i}", "flaky", f"x{i}") for i in range(4)] + \
            [sample("exact", "exact", "a", "a")]
    limited = _limited(scorer, monkeypatch, 0.5)
    with pytest.raises(RewardFailureRateError) as caught:
        limited.score(batch)
    message = str(caught.value)
    assert "4 of 6 samples failed to score (67% > reward.max_failure_rate=0.5)" in message
    assert "worst task 'flaky': 4 of 5 failed (0 timeouts)" in message
    assert message.count("cannot parse") == 3 and "bad-0 (flaky, error): ValueError: cannot parse 'x0'" in message
    assert caught.value.task == "flaky" and len(caught.value.failures) == 4 and "\n" not in message
    # at the limit, or under a looser one, the call scores as before
    assert len(limited.score(batch[:1] + batch[2:5] + batch[5:] + batch[:1]).failures) == 3  # 3 of 6
    assert len(_limited(scorer, monkeypatch, 0.7).score(batch).failures) == 4


def test_hanging_reward_on_most_samples_stops_the_call(scorer, monkeypatch):
    limited = _limited(scorer, monkeypatch, 0.5)
    start = time.monotonic()
    with pytest.raises(RewardFailureRateError, match=r"2 of 3 samples .* worst task 'hang': 2 of 2 failed "
                                                     r"\(2 timeouts\); first failures: h0 \(hang, timeout\)"):
        limited.score([sample("h0", "hang", "x"), sample("h1", "hang", "x"), sample("e", "exact", "a", "a")])
    assert time.monotonic() - start < 3 * TIMEOUT_S  # both hangs side by side, then the exact match
    assert limited.score([sample("after", "exact", "a", "a")]).raw == [1.0]  # the pool goes on


def test_the_failure_rate_limit_applies_to_the_reward_model_and_by_default():
    assert RewardConfig(verifiers={"t": "math"}, num_workers=1).max_failure_rate == 0.5  # as the run builds it
    cfg = RewardConfig(verifiers={"chat": "reward_model"}, num_workers=1)
    with RewardScorer(cfg, reward_model=FakeRewardModel(fail=True)) as s:
        with pytest.raises(RewardFailureRateError, match="worst task 'chat': 2 of 2 failed .* CUDA out of memory"):
            s.score([sample(0, "chat", "abc"), sample(1, "chat", "de")])
