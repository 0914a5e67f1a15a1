"""A character-level tokenizer in HF format, with the chat template of `templates.py`.

    tokenizer = build_char_tokenizer(TemplateConfig())
    tokenizer.save_pretrained(out_dir)               # AutoTokenizer.from_pretrained(out_dir) loads it
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, mode="nothink")

Design decisions:
- One token per character: printable ASCII, newline and tab; anything else is `<unk>`. It is a
  `tokenizers` BPE model with no merges (so every character is its own token) and a `Fuse`
  decoder (tokens are concatenated back without spaces).
- Turn, vision and think markers are added tokens, matched before the character model, so
  `<|image_pad|>` is one id. Turn and vision markers are special (dropped by
  `decode(skip_special_tokens=True)`); `<think>` / `</think>` are not, so decoded responses keep
  the think block that the reward verifiers look for (as in Qwen3).
- eos is `<|im_end|>` (generation stops at the end of the assistant turn); pad is `<|endoftext|>`.
- `templates.py` is the single source of the prompt format: the Jinja chat template below mirrors
  `render_prompt` (mode from the `mode` argument, else a trailing /think or /nothink in the last
  user message, else the configured default; history keeps answers without thinking; the
  configured system prompt when the conversation has none), and a test renders both over a grid
  of conversations. With `add_generation_prompt=False` the template renders the turns only.
"""
from __future__ import annotations

import json

from megatron_vlm.data.templates import IM_END, IM_START, THINK_CLOSE, THINK_OPEN, TemplateConfig

PAD, UNK = "<|endoftext|>", "<unk>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK)
PLAIN_ADDED_TOKENS = (THINK_OPEN, THINK_CLOSE)
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")

_CHAT_TEMPLATE = r"""
{%- set ns = namespace(mode=DEFAULT_MODE, last_user='') -%}
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for item in content -%}
{%- if item['type'] == 'image' -%}{{ IMAGE_PLACEHOLDER }}
{%- elif item['type'] == 'text' -%}{{ item['text'] }}
{%- else -%}{{ raise_exception("content items must be of type 'text' or 'image', got " ~ item['type']) }}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}{%- if message['role'] == 'user' -%}
{%- set ns.last_user = text(message['content']) -%}{%- endif -%}{%- endfor -%}
{%- if mode is defined and mode is not none -%}
{%- if mode not in ['think', 'nothink'] -%}{{ raise_exception("mode must be 'think' or 'nothink'") }}{%- endif -%}
{%- set ns.mode = mode -%}
{%- elif ns.last_user.rstrip().endswith('/nothink') -%}{%- set ns.mode = 'nothink' -%}
{%- elif ns.last_user.rstrip().endswith('/think') -%}{%- set ns.mode = 'think' -%}
{%- endif -%}
{%- if SYSTEM is not none and messages[0]['role'] != 'system' -%}
{{ '<|im_start|>system\n' + SYSTEM + '<|im_end|>\n' }}
{%- endif -%}
{%- for message in messages -%}
{%- set content = text(message['content']) -%}
{%- if message['role'] == 'assistant' -%}
{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1].replace('<|im_end|>', '').strip() -%}
{%- else -%}{%- set content = content.strip() -%}{%- endif -%}
{%- endif -%}
{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' }}{%- if ns.mode == 'nothink' -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}
{%- endif -%}"""


def chat_template(cfg: TemplateConfig) -> str:
    """The Jinja chat template equivalent to `templates.render_prompt(messages, cfg, mode)`."""
    return (_CHAT_TEMPLATE.strip()
            .replace("DEFAULT_MODE", json.dumps(cfg.default_mode))
            .replace("SYSTEM", "none" if cfg.system is None else json.dumps(cfg.system, ensure_ascii=False))
            .replace("IMAGE_PLACEHOLDER", json.dumps(cfg.image_placeholder, ensure_ascii=False)))


def build_char_tokenizer(cfg: TemplateConfig | None = None):
    """A `PreTrainedTokenizerFast`: specials first (ids 0..7), then <think>, </think>, then the
    characters. `image_token` / `video_token` / `vision_start_token` / `vision_end_token` are set
    as the Qwen-VL processors look them up."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD,
                              "vision_start_token": VISION_START, "vision_end_token": VISION_END},
        model_max_length=4096, padding_side="right")
    tokenizer.chat_template = chat_template(cfg or TemplateConfig())
    return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
    """The ids the model config and the processor need, read from the tokenizer."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END), ("eos_token_id", IM_END), ("pad_token_id", PAD))}
    if tokenizer.unk_token_id in ids.values():
        raise ValueError(f"tokenizer lacks one of the Qwen-VL special tokens: {ids}")
    return ids
