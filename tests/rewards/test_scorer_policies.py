"""Per-task policies of the scorer (#17): default metadata per task (short-answer strictness),
strict format, the well-formed share, and the reward contract at the scorer's door.

One scorer (one forkserver worker) is shared by the module: worker start-up is the slow part.
"""
import pytest

from megatron_vlm.rewards import RewardConfig, RewardSample, RewardScorer


@pytest.fixture(scope="module")
def scorer():
    cfg = RewardConfig(verifiers={"trivia": "short_answer", "trivia_strict": "short_answer"},
                       task_metadata={"trivia_strict": {"match": "exact"}},
                       num_workers=1, max_failure_rate=1.0)
    with RewardScorer(cfg) as s:
        yield s


def sample(sample_id, task, response, reference=None, **metadata):
    return RewardSample(sample_id=sample_id, task=task, prompt="p", response=response,
                        reference=reference, metadata=metadata)


def test_task_metadata_sets_strictness_per_task(scorer):
    result = scorer.score([sample(0, "trivia", "It is Paris.", "Paris"),
                           sample(1, "trivia_strict", "It is Paris.", "Paris"),
                           sample(2, "trivia_strict", "Paris", "Paris"),
                           sample(3, "trivia_strict", "It is Paris.", "Paris", match="sentence")])  # the sample wins
    assert result.raw == [1.0, 0.0, 1.0, 1.0], result.failures


def test_task_metadata_is_validated():
    with pytest.raises(ValueError, match=r"reward.task_metadata\['nope'\]"):
        RewardConfig(verifiers={"a": "short_answer"}, task_metadata={"nope": {}})
