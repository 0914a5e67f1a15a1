"""The chat template's think / nothink modes."""
import pytest

from megatron_vlm.data.templates import (EMPTY_THINK, TemplateConfig, format_reward, is_well_formed, mode_flag,
                                         render_prompt, render_response, split_think)

USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]


def test_think_mode_prompt_and_target():
    cfg = TemplateConfig()
    prompt = render_prompt(USER, cfg)
    assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is shown?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert render_response("A cat.", "I see fur.", "think") == "<think>\nI see fur.\n</think>\n\nA cat.<|im_end|>"


def test_nothink_has_an_empty_think_block_in_the_prompt():
    messages = [{"role": "user", "content": "2+2? /nothink"}]
    prompt = render_prompt(messages, TemplateConfig())
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert EMPTY_THINK == "<think>\n\n</think>\n\n"
    assert "2+2? /nothink" in prompt  # the soft switch stays visible, as at inference
    assert render_response("4", None, "nothink") == "4<|im_end|>"
    # the explicit mode wins over the flag; the default applies without either
    assert render_prompt(messages, TemplateConfig(), mode="think").endswith("assistant\n")
    assert render_prompt([{"role": "user", "content": "hi"}], TemplateConfig(default_mode="nothink")).endswith(
        EMPTY_THINK)
    assert mode_flag("x /think") == "think" and mode_flag("x / think") is None


def test_history_keeps_answers_not_thinking_and_system():
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "<think>\nsecret\n</think>\n\nfirst answer"},
                {"role": "user", "content": "b /think"}]
    prompt = render_prompt(messages, TemplateConfig(system="Be brief."))
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "secret" not in prompt and "<|im_start|>assistant\nfirst answer<|im_end|>" in prompt
    with pytest.raises(ValueError, match="ending with a user turn"):
        render_prompt(messages[:2], TemplateConfig())


def test_well_formed_and_no_format_reward_by_default():
    good = "<think>\nreason\n</think>\n\n42<|im_end|>"
    assert is_well_formed(good, "think") and not is_well_formed("42", "think")
    assert not is_well_formed("<think>a</think><think>b</think>42", "think")
    assert is_well_formed("42<|im_end|>", "nothink") and not is_well_formed("</think>42", "nothink")
    assert format_reward(good, "think", TemplateConfig()) == 0.0
    assert format_reward(good, "think", TemplateConfig(format_reward=0.1)) == 0.1
    assert split_think(good) == ("reason", "42")
    assert split_think("no block") == (None, "no block")


def test_config_and_mode_validation():
    with pytest.raises(ValueError, match="template.default_mode must be one of .* got 'fast'"):
        TemplateConfig(default_mode="fast")
    with pytest.raises(ValueError, match="think mode needs the thinking text"):
        render_response("4", None, "think")
