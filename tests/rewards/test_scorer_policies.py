"""Per-task policies of the scorer (#17): default metadata per task (short-answer strictness),
strict format, the well-formed share, and the reward contract at the scorer's door.

One scorer (one forkserver worker) is shared by the module: worker start-up is the slow part.
"""
import pytest

from megatron_vlm.rewards import RewardConfig, RewardSample, RewardScorer
from megatron_vlm.rewards.extract import format_problem


@pytest.fixture(scope="module")
def scorer():
    cfg = RewardConfig(verifiers={"trivia": "short_answer", "trivia_strict": "short_answer",
                                  "gsm": "numeric", "gsm_strict": "numeric", "gsm_bonus": "numeric",
                                  "gsm_lax_bonus": "numeric"},
                       task_metadata={"trivia_strict": {"match": "exact"}},
                       strict_format={"gsm_strict": True, "gsm": False, "gsm_bonus": True},
                       format_reward={"gsm_bonus": 0.25, "gsm_lax_bonus": 0.5},
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
    with pytest.raises(ValueError, match=r"reward.task_metadata names task 'nope', which has no verifier"):
        RewardConfig(verifiers={"a": "short_answer"}, task_metadata={"nope": {}})


REASONING = "<think>Six times seven is forty-two, so the total is 42.</think>"
FORMATS = [
    # (response, problem or None)
    (f"{REASONING}The answer is 42.", None),
    ("Six times seven is forty-two.</think>42", None),          # <think> opened by the prompt
    ("<think>六乘以七等于四十二</think>答案是 42", None),
    ("The answer is 42.", "no think block"),
    ("<think>Six times seven is forty-two, so 42", "unclosed think block"),
    ("<think></think>42", "empty or junk reasoning"),
    ("<think>...!!! 42 42 42</think>42", "empty or junk reasoning"),
    ("<think>ok ok ok ok</think>42", "empty or junk reasoning"),
    ("<think>\nLeft 3, right 7. 3+7=10\n</think>\n\n10", None),  # the digits demo's trace
    ("Left 3, right 7. 3+7=10\n</think>\n\n10", None),           # the same, opened by the prompt
    ("<think>\n1, 9\n</think>\n\n9", "empty or junk reasoning"),
    ("<think>think think</think>42", "empty or junk reasoning"),
    (f"{REASONING}", "no final answer"),
    (f"{REASONING}</think>42", "several </think>"),
    (f"42 {REASONING}42", "<think> not at the start"),
    (f"{REASONING}<think>again</think>42", "several </think>"),
    (f"{REASONING}42 <think>", "<think> after </think>"),
]


@pytest.mark.parametrize("response, problem", FORMATS, ids=[f[0][:30] for f in FORMATS])
def test_format_problem(response, problem):
    assert format_problem(response) == problem


@pytest.mark.parametrize("response, problem", [f for f in FORMATS if f[0].startswith("<think>") and "</think>" in f[0]],
                         ids=lambda f: str(f)[:30])
def test_an_opening_tag_left_to_the_prompt_changes_no_verdict(response, problem):
    """A template that opens the think block in the prompt: the response without `<think>` is
    judged exactly as with it (the tag used to count as a word of reasoning)."""
    assert format_problem(response[len("<think>"):]) == problem


def test_strict_format_refuses_malformed_responses_and_both_modes_log_the_share(scorer):
    responses = [f"{REASONING}The answer is 42.", "The answer is 42.", "<think></think>42",
                 "<think>Six times seven is forty-two, so 42"]
    batch = ([sample(f"lax-{i}", "gsm", r, "42") for i, r in enumerate(responses)]
             + [sample(f"strict-{i}", "gsm_strict", r, "42") for i, r in enumerate(responses)])
    result = scorer.score(batch)
    assert result.raw == [1.0, 1.0, 1.0, 0.0,   # lax: pays the number after </think> or the whole text
                          1.0, 0.0, 0.0, 0.0], result.failures
    assert result.failures == []
    assert result.metrics["reward/gsm/well_formed"] == result.metrics["reward/gsm_strict/well_formed"] == 0.25
    assert result.metrics["reward/gsm/format_refused"] == 0.0
    assert result.metrics["reward/gsm_strict/format_refused"] == 3.0
    assert result.metrics["reward/well_formed"] == 0.25


def test_strict_format_is_validated():
    with pytest.raises(ValueError, match=r"reward.strict_format\['gsm'\] must be true or false"):
        RewardConfig(verifiers={"gsm": "numeric"}, strict_format={"gsm": "yes"})
    with pytest.raises(ValueError, match=r"reward.strict_format names task 'other', which has no verifier"):
        RewardConfig(verifiers={"gsm": "numeric"}, strict_format={"other": True})


def test_format_reward_pays_the_template_and_verdicts_keep_the_verifiers_score(scorer):
    """DeepSeek-R1's accuracy + format reward: with strict format a malformed answer earns 0, a
    well-formed wrong one the bonus, a well-formed right one 1 + bonus; without strict format a
    malformed right answer keeps its 1. A sample that fails to score gets no bonus."""
    responses = [(f"{REASONING}The answer is 42.", "42"), (f"{REASONING}The answer is 41.", "42"),
                 ("The answer is 42.", "42"), ("<think></think>41", "42"), (f"{REASONING}42", "forty-two")]
    batch = ([sample(f"b-{i}", "gsm_bonus", r, ref) for i, (r, ref) in enumerate(responses)]
             + [sample(f"l-{i}", "gsm_lax_bonus", r, ref) for i, (r, ref) in enumerate(responses)])
    result = scorer.score(batch)
    assert result.raw == [1.25, 0.25, 0.0, 0.0, 0.0,
                          1.5, 0.5, 1.0, 0.0, 0.0], result.failures
    assert result.verdicts == [1.0, 0.0, 1.0, 0.0, 0.0] * 2
    assert result.well_formed == [True, True, False, False, True] * 2
    assert [f.sample_id for f in result.failures] == ["b-4", "l-4"]  # a reference with no number
    assert result.metrics["reward/gsm_bonus/verdict_mean"] == pytest.approx(2 / 5)
    assert result.metrics["reward/gsm_bonus/raw_mean"] == pytest.approx(1.5 / 5)
    assert result.metrics["reward/gsm_bonus/format_refused"] == 2.0


@pytest.mark.parametrize("bonus", [1.0, -0.1, True, "0.2"])
def test_format_reward_is_validated(bonus):
    with pytest.raises(ValueError, match=r"reward.format_reward\['gsm'\] must be a number in \[0, 1\)"):
        RewardConfig(verifiers={"gsm": "numeric"}, format_reward={"gsm": bonus})
    with pytest.raises(ValueError, match=r"reward.format_reward names task 'other', which has no verifier"):
        RewardConfig(verifiers={"gsm": "numeric"}, format_reward={"other": 0.1})
