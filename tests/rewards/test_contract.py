"""The reward contract at the scorer (#17): return types, malformed references, non-string
responses, load-time validation, and workers that die during start-up."""
import time

import pytest

from megatron_vlm.rewards import RewardConfig, RewardSample, RewardScorer
from megatron_vlm.rewards.pool import Job, WorkerPool, WorkerStartupError
from megatron_vlm.rewards.registry import BadReference, validate_sample
from megatron_vlm.rewards.scorer import validate_samples

from . import user_rewards

USER = user_rewards.__name__
FAILURE_SCORE = -1.0
VERIFIERS = {"text": f"{USER}:returns_text", "bool": f"{USER}:returns_bool", "int": f"{USER}:returns_int",
             "short": "short_answer", "num": "numeric", "math": "math", "mcq": "choice", "ifeval": "instructions",
             "order": "sequence", "parts": "subquestions", "formula": "formula", "yesno": "boolean"}


@pytest.fixture(scope="module")
def scorer():
    cfg = RewardConfig(verifiers=VERIFIERS, num_workers=1, failure_score=FAILURE_SCORE, max_failure_rate=1.0)
    with RewardScorer(cfg) as s:
        yield s


def sample(sample_id, task, response, reference=None, **metadata):
    return RewardSample(sample_id=sample_id, task=task, prompt="p", response=response,
                        reference=reference, metadata=metadata)


def test_return_types(scorer):
    result = scorer.score([sample("str", "text", "x"), sample("bool", "bool", "yes"), sample("int", "int", "abc")])
    assert result.raw == [FAILURE_SCORE, 1.0, 3.0]
    [failure] = result.failures
    assert failure.sample_id == "str" and failure.kind == "error"
    assert "returned str '1.0'" in failure.message and "real number" in failure.message


BAD_REFERENCES = [
    ("short", "None", None, {}, "short_answer: reference must be"),
    ("short", "Paris", [], {}, "short_answer: reference must be"),
    ("short", "Paris", ["Paris", ""], {}, "empty accepted answer"),
    ("num", "42", "about forty", {}, "numeric: reference must be"),
    ("num", "42", "4 or 5", {}, "exactly one number"),
    ("num", "42", None, {}, "numeric: reference must be"),
    ("math", "\\boxed{1}", "", {}, "math: reference must be"),
    ("math", "\\boxed{1}", None, {}, "math: reference must be"),
    ("mcq", "B", "?", {}, "choice: reference must be option letters"),
    ("mcq", "B", None, {}, "choice: reference must be option letters"),
    ("ifeval", "Hello", None, {}, "instructions: metadata 'constraints' must be a non-empty list"),
    ("ifeval", "Hello", None, {"constraints": []}, "instructions: metadata 'constraints' must be"),
    ("ifeval", "Hello", None, {"constraints": [{"type": "rhymes"}]}, "unknown constraint 'rhymes'"),
    ("order", "B, A", None, {}, "sequence: reference must be"),
    ("parts", "(1) P", "Paris", {}, "subquestions: reference must be a non-empty list"),
    ("parts", "(1) P", [1, 2], {"verifiers": ["numeric"]}, "'verifiers' has 1 entries for 2 parts"),
    ("formula", "x", None, {}, "formula: reference must be"),
    ("formula", "x", "(((", {}, "formula: cannot parse the reference"),   # found in the worker
    ("yesno", "yes", "maybe", {}, "boolean: reference must be"),
]


def test_malformed_references_are_counted_errors_never_paid(scorer):
    batch = [sample(f"bad-{i}", task, response, reference, **meta)
             for i, (task, response, reference, meta, _) in enumerate(BAD_REFERENCES)]
    result = scorer.score(batch)
    assert result.raw == [FAILURE_SCORE] * len(batch)
    by_id = {f.sample_id: f for f in result.failures}
    for i, (task, _, _, _, expected) in enumerate(BAD_REFERENCES):
        failure = by_id[f"bad-{i}"]
        assert failure.kind == "bad_reference" and expected in failure.message, (task, failure)
    assert result.metrics["reward/bad_references"] == len(batch)
    assert result.metrics["reward/short/bad_references"] == 3.0


@pytest.mark.parametrize("task, response, reference, meta, expected", BAD_REFERENCES,
                         ids=[f"{b[0]}-{b[2]!r}" for b in BAD_REFERENCES])
def test_verifiers_raise_bad_reference_themselves(task, response, reference, meta, expected):
    from megatron_vlm.rewards.registry import get_verifier
    with pytest.raises(BadReference, match=expected.replace("(", r"\(").replace("[", r"\[")):
        get_verifier(VERIFIERS[task])(response, reference, meta)


def test_good_references_pass_validation():
    for name, reference, meta in [("short_answer", ["Paris", "巴黎"], {}), ("numeric", "12 cm", {}),
                                  ("numeric", 0.25, {}), ("math", "\\frac{1}{2}", {}), ("choice", ["A", "C"], {}),
                                  ("instructions", None, {"constraints": [{"type": "max_words", "value": 5}]}),
                                  ("sequence", "B > A > C", {}), ("subquestions", [1, "a"], {}),
                                  ("boolean", "oui", {}), ("formula", "(x+1)^2", {}), (f"{USER}:returns_int", None, {})]:
        validate_sample(name, reference, meta)


def test_non_string_responses_are_rejected_naming_the_sample(scorer):
    result = scorer.score([sample("none-7", "short", None, "Paris"), sample("ok", "short", "Paris", "Paris"),
                           sample("list-8", "num", ["42"], "42")])
    assert result.raw == [FAILURE_SCORE, 1.0, FAILURE_SCORE]
    messages = {f.sample_id: (f.kind, f.message) for f in result.failures}
    assert messages["none-7"] == ("bad_response", "sample 'none-7' (task 'short'): response must be a str, got NoneType")
    assert messages["list-8"][0] == "bad_response" and "got list" in messages["list-8"][1]


def test_load_time_validation_names_every_bad_sample():
    cfg = RewardConfig(verifiers={"ifeval": "instructions", "short": "short_answer"})
    good = [RewardSample(sample_id=1, task="ifeval", prompt="p", response=None,
                         metadata={"constraints": [{"type": "max_words", "value": 5}]}),
            RewardSample(sample_id=2, task="short", prompt="p", response=None, reference="Paris")]
    validate_samples(cfg, good)
    bad = good + [RewardSample(sample_id=3, task="ifeval", prompt="p", response=None),
                  RewardSample(sample_id=4, task="short", prompt="p", response=None, reference=None),
                  RewardSample(sample_id=5, task="other", prompt="p", response=None)]
    with pytest.raises(BadReference) as info:
        validate_samples(cfg, bad)
    message = str(info.value)
    assert message.startswith("3 of 5 samples cannot be scored")
    assert "sample 3 (task 'ifeval'): instructions: metadata 'constraints'" in message
    assert "sample 4 (task 'short'): short_answer: reference must be" in message
    assert "sample 5: task 'other' has no verifier" in message


def test_worker_dying_at_start_up_backs_off_then_fails_with_its_error(monkeypatch):
    monkeypatch.setenv("STARTUP_CRASH", "raise")
    start = time.monotonic()
    with WorkerPool(1, start_method="spawn", preload=("tests.rewards.startup_crash",),
                    max_start_failures=3, startup_backoff_s=0.05) as pool:
        with pytest.raises(WorkerStartupError, match="failed to start 3 times in a row; last error: "
                                                     "RuntimeError: boom at start-up"):
            pool.run([Job(f"{USER}:returns_int", ("abc", None, {}))], timeout_s=5.0)
        assert pool.start_failures == 3 and pool.restarts == 2
    # two back-offs (0.05 s, 0.1 s) plus three spawns: bounded, not a tight loop nor a hang
    assert time.monotonic() - start < 30


def test_worker_exiting_at_start_up_reports_its_exit_code(monkeypatch):
    monkeypatch.setenv("STARTUP_CRASH", "exit")
    with WorkerPool(1, start_method="spawn", preload=("tests.rewards.startup_crash",),
                    max_start_failures=2, startup_backoff_s=0.05) as pool:
        with pytest.raises(WorkerStartupError, match=r"exited during start-up \(exit code 7\)"):
            pool.run([Job(f"{USER}:returns_int", ("abc", None, {}))], timeout_s=5.0)


def test_worker_failing_once_at_start_up_recovers(monkeypatch, tmp_path):
    monkeypatch.setenv("STARTUP_CRASH", f"once:{tmp_path / 'marker'}")
    with WorkerPool(1, start_method="spawn", preload=("tests.rewards.startup_crash",),
                    max_start_failures=3, startup_backoff_s=0.05) as pool:
        [result] = pool.run([Job(f"{USER}:returns_int", ("abcd", None, {}))], timeout_s=5.0)
        assert result.value == 4.0 and pool.start_failures == 1
