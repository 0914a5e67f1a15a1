"""The `judge` verifier kind on a tiny random Qwen3 causal LM with a char-level tokenizer built
here (nothing is downloaded): prompt assembly, strict verdict parsing, batching, failures and
timeouts, and the scorer's accounting. The judge's quality is the user's model's business."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from megatron_vlm.rewards import RewardConfig, RewardSample, RewardScorer
from megatron_vlm.rewards.judge import JudgeConfig, LocalJudge, Verdict, parse_verdict

from .test_reward_model import char_tokenizer

QUESTIONS = ["What is the capital of France?", "2+2?", "Name a colour.", "Who wrote Hamlet, the play?"]
REFERENCES = ["Paris", "4", ["red", "blue"], "Shakespeare"]
RESPONSES = ["<think>Hmm, France.</think>Paris", "4", "<think>blue", "Marlowe"]


@pytest.fixture(scope="module")
def parts():
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen3ForCausalLM(config).eval(), tokenizer


def test_prompt_has_question_reference_and_final_answer_only(parts):
    judge = LocalJudge(*parts, JudgeConfig())
    [prompt] = judge.prompts(["What is 2+2?"], [["4", "four"]], ["<think>secret draft 5</think>4"])
    assert "Question: What is 2+2?" in prompt and "Reference answer: 4 / four" in prompt
    assert "Candidate answer: 4\n" in prompt and "secret" not in prompt


VERDICTS = [("CORRECT", 1.0), (" INCORRECT.", 0.0), ("\nCORRECT because", 1.0), ("INCORRECT\n", 0.0)]
UNPARSEABLE = ["", "correct", "Correct", "I think CORRECT", "CORRECTINCORRECT", "maybe", "CORRECT?"]


@pytest.mark.parametrize("text, score", VERDICTS)
def test_verdict_parsing(text, score):
    assert parse_verdict(text, JudgeConfig().verdicts) == score


@pytest.mark.parametrize("text", UNPARSEABLE)
def test_unparseable_verdicts_are_errors(text):
    with pytest.raises(ValueError, match="unparseable judge verdict"):
        parse_verdict(text, JudgeConfig().verdicts)


def test_batched_equals_unbatched(parts):
    batched = LocalJudge(*parts, JudgeConfig(batch_size=3))
    single = LocalJudge(*parts, JudgeConfig(batch_size=1))
    prompts = batched.prompts(QUESTIONS, REFERENCES, RESPONSES)
    together, _ = batched.generate(prompts)
    one_by_one = [single.generate([p])[0][0] for p in prompts]
    assert together == one_by_one  # greedy, left-padded: padding changes nothing


def test_real_generation_is_parsed_strictly(parts):
    """A random model's output is no verdict: every sample is a counted failure. Declaring the
    model's own first word for the first prompt a verdict shows that the plumbing parses it."""
    judge = LocalJudge(*parts, JudgeConfig(batch_size=2))
    verdicts = judge.judge(QUESTIONS, REFERENCES, RESPONSES)
    assert all(v.score is None and "unparseable judge verdict" in v.error and not v.timed_out for v in verdicts)
    text = judge.generate(judge.prompts(QUESTIONS[:1], REFERENCES[:1], RESPONSES[:1]))[0][0]
    word = text.split()[0].rstrip(".,;:!") if text.split() else None
    if not word:
        pytest.skip("the random model's first prompt produced only whitespace")
    own = LocalJudge(*parts, JudgeConfig(batch_size=2, verdicts={word: 1.0, "NEVER": 0.0}))
    assert own.judge(QUESTIONS[:1], REFERENCES[:1], RESPONSES[:1])[0].score == 1.0


def test_missing_reference_and_timeout(parts):
    judge = LocalJudge(*parts, JudgeConfig(timeout_s=1e-6))
    verdicts = judge.judge(QUESTIONS[:2], [None, "4"], RESPONSES[:2])
    assert verdicts[0].score is None and "judge: reference must be a non-empty answer" in verdicts[0].error
    assert verdicts[1].score is None and verdicts[1].timed_out and "timed out" in verdicts[1].error


def test_config_is_validated():
    with pytest.raises(ValueError, match="judge.template must contain"):
        JudgeConfig(template="{question} {answer}")
    with pytest.raises(ValueError, match="judge.timeout_s"):
        JudgeConfig(timeout_s=0)


class ScriptedJudge:
    """Stands in for LocalJudge in the scorer test: verdicts by reference."""

    def judge(self, questions, references, responses):
        script = {"Paris": Verdict(1.0), "4": Verdict(0.0), "x": Verdict(None, "unparseable judge verdict 'hm'"),
                  "slow": Verdict(None, "judge timed out after 1 s", True, 1.0)}
        return [script[r] for r in references]


def test_scorer_routes_judge_tasks_and_counts_failures():
    cfg = RewardConfig(verifiers={"open": "judge", "mcq": "choice"}, num_workers=1, failure_score=-1.0,
                       max_failure_rate=1.0)
    with pytest.raises(ValueError, match="no judge was given"):
        RewardScorer(cfg)
    with RewardScorer(cfg, judge=ScriptedJudge()) as scorer:
        samples = [RewardSample(sample_id=i, task="open", prompt="q", response="a", reference=r)
                   for i, r in enumerate(["Paris", "4", "x", "slow"])]
        samples.append(RewardSample(sample_id=9, task="mcq", prompt="q", response="B", reference="B"))
        result = scorer.score(samples)
    assert result.raw == [1.0, 0.0, -1.0, -1.0, 1.0]
    assert [(f.sample_id, f.kind) for f in result.failures] == [(2, "error"), (3, "timeout")]
    assert result.metrics["reward/open/timeouts"] == 1.0 and result.metrics["reward/open/failures"] == 2.0
