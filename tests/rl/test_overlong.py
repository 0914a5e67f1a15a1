"""Over-long handling: DAPO's soft penalty, masking truncated responses, the forced answer."""
import pytest
import torch

from megatron_vlm.rl.overlong import (ForcedAnswerConfig, OverlongPenaltyConfig, forced_answer_text, is_truncated,
                                      mask_truncated, merge_forced_answer, needs_forced_answer, plan_forced_answers,
                                      soft_overlong_penalty)


def test_soft_overlong_penalty_closed_form():
    cfg = OverlongPenaltyConfig(max_response_len=100, buffer_len=20, penalty_factor=1.0)
    lengths = torch.tensor([10, 80, 85, 90, 100, 120])
    assert soft_overlong_penalty(lengths, cfg).tolist() == pytest.approx([0, 0, -0.25, -0.5, -1.0, -1.0])
    half = OverlongPenaltyConfig(max_response_len=100, buffer_len=20, penalty_factor=0.5)
    assert soft_overlong_penalty(lengths, half).tolist() == pytest.approx([0, 0, -0.125, -0.25, -0.5, -0.5])
    with pytest.raises(ValueError, match="overlong.buffer_len must be in \\(0, max_response_len=100\\], got 0"):
        OverlongPenaltyConfig(max_response_len=100, buffer_len=0)


def test_mask_truncated_removes_whole_sequences():
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1.0])
    cu = torch.tensor([0, 3, 5, 7])
    truncated = is_truncated(torch.tensor([3, 2, 2]), max_response_len=2, finished=torch.tensor([True, False, True]))
    assert truncated.tolist() == [False, True, False]
    assert mask_truncated(mask, cu, truncated).tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert is_truncated(torch.tensor([3, 2, 1]), max_response_len=2).tolist() == [True, True, False]


# a character tokenizer: one id per character
def encode(text):
    return [ord(c) for c in text]


def test_forced_answer_plans_only_responses_cut_off_while_thinking():
    cfg = ForcedAnswerConfig(answer_budget=16, answer_prefix="<answer>")
    prompts = [[1, 2], [3], [4], [5]]
    texts = ["<think>\nlong reasoning", "<think>\nshort</think>\nA", "<think>\nx</think>\nthe answer is",
             "<think>\nstill"]
    responses = [encode(t) for t in texts]
    finished = [False, True, False, True]
    plans = plan_forced_answers(prompts, responses, texts, finished, encode, cfg)
    assert [p.index for p in plans] == [0]  # 1 finished; 2 had closed its think block; 3 finished
    inserted = encode("</think>\n<answer>")
    assert plans[0].inserted_ids == inserted
    assert plans[0].prompt_ids == [1, 2] + responses[0] + inserted
    assert plans[0].max_new_tokens == 16
    assert forced_answer_text(texts[0], cfg) == "<think>\nlong reasoning</think>\n<answer>"
    assert needs_forced_answer("<think>\nabc", finished=False, cfg=cfg)


def test_merge_masks_the_inserted_tokens():
    cfg = ForcedAnswerConfig()
    (plan,) = plan_forced_answers([[9]], [[7, 7]], ["<think>ab"], [False], encode, cfg)
    ids, mask = merge_forced_answer([7, 7], plan, [42, 43])
    assert ids == [7, 7] + encode("</think>\n") + [42, 43]
    assert mask == [1, 1] + [0] * len("</think>\n") + [1, 1]


def test_forced_answer_config_validation():
    with pytest.raises(ValueError, match="forced_answer.delimiter must close the think block"):
        ForcedAnswerConfig(delimiter="\n\nAnswer:")
    with pytest.raises(ValueError, match="batch fields differ in length"):
        plan_forced_answers([[1]], [], [], [], encode, ForcedAnswerConfig())
