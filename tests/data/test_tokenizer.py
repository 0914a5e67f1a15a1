"""The character tokenizer: HF round trip, one id per marker, and the chat template = templates.py."""
import itertools

import pytest
from transformers import AutoTokenizer

from megatron_vlm.data.templates import TemplateConfig, render_prompt
from megatron_vlm.data.tokenizer import SPECIAL_TOKENS, build_char_tokenizer, token_ids

IMAGE_Q = [{"type": "image"}, {"type": "text", "text": "What is the sum? "}]
CONVERSATIONS = [
    [{"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "2+2? /nothink"}],
    [{"role": "user", "content": "2+2? /think \n"}],
    [{"role": "user", "content": "x / think"}],
    [{"role": "user", "content": IMAGE_Q + [{"type": "image"}, {"type": "text", "text": "and? /nothink"}]}],
    [{"role": "system", "content": "Own system."}, {"role": "user", "content": IMAGE_Q}],
    [{"role": "user", "content": "a /nothink"},
     {"role": "assistant", "content": "<think>\nsecret\n</think>\n\n  first answer<|im_end|>"},
     {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  plain answer "},
     {"role": "user", "content": [{"type": "text", "text": "quote \" and ü /think"}]}],
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizers = {}
    for default_mode, system in itertools.product(("think", "nothink"), (None, 'Be "brief".')):
        cfg = TemplateConfig(default_mode=default_mode, system=system)
        path = tmp_path_factory.mktemp(f"tok-{default_mode}-{system is None}")
        build_char_tokenizer(cfg).save_pretrained(path)
        tokenizers[default_mode, system] = cfg, AutoTokenizer.from_pretrained(path)
    return tokenizers


def test_chat_template_renders_what_templates_py_renders(saved):
    checked = 0
    modes = (None, "think", "nothink")
    for (cfg, tokenizer), messages, mode in itertools.product(saved.values(), CONVERSATIONS, modes):
        expected = render_prompt(messages, cfg, mode)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, mode=mode)
        assert rendered == expected
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, mode=mode)["input_ids"]
        assert ids == tokenizer(expected, add_special_tokens=False).input_ids
        checked += 1
    assert checked == 4 * len(CONVERSATIONS) * 3
    cfg, tokenizer = saved["think", None]
    turns = tokenizer.apply_chat_template(CONVERSATIONS[6], tokenize=False, add_generation_prompt=False)
    assert turns.endswith("<|im_start|>user\nb<|im_end|>\n") and "secret" not in turns


def test_markers_are_single_ids_and_text_round_trips(saved):
    _, tokenizer = saved["think", None]
    ids = token_ids(tokenizer)
    assert ids["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>") != tokenizer.unk_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>3 + 5 = ?<|im_end|>\n<think>\nx\n</think>\n\n8"
    encoded = tokenizer(text, add_special_tokens=False).input_ids
    assert len(encoded) == len(text) - sum(len(t) - 1 for t in SPECIAL_TOKENS + ("<think>", "</think>")
                                           for _ in range(text.count(t)))
    assert tokenizer.decode(encoded) == text
    # think tags survive skip_special_tokens: the verifiers look for them in decoded responses
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\n3 + 5 = ?\n<think>\nx\n</think>\n\n8"
    assert tokenizer.decode(tokenizer("é", add_special_tokens=False).input_ids) == "<unk>"
    assert len(tokenizer) == 107
