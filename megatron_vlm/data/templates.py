"""Chat template with /think and /nothink modes (Qwen3 / GLM-4.5V style, ChatML markup).

    prompt = render_prompt(messages, cfg)            # ends with the generation prefix of its mode
    target = render_response(answer, thinking, mode)  # what the model should write after the prompt

Modes: "think" (the model writes `<think>\n...\n</think>\n\n` then the answer) and "nothink" (the
think block is present and empty, `<think>\n\n</think>\n\n`, and is part of the prompt, so the
model only writes the answer). The mode comes from the `mode` argument, else from a trailing
`/think` or `/nothink` in the last user message (the soft switch; the flag stays in the text,
as the model sees it at inference), else `cfg.default_mode`. Earlier assistant turns are rendered
without their thinking (only the final answer is history, as in Qwen3).

No format reward by default: `format_reward` returns cfg.format_reward (0.0 unless a recipe sets
it) for a well-formed response, so correctness alone is rewarded unless asked otherwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

MODES = ("think", "nothink")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
_FLAG = re.compile(r"/(think|nothink)\s*$")


@dataclass(kw_only=True)
class TemplateConfig:
    default_mode: str = "think"
    system: str | None = None
    image_placeholder: str = "<|vision_start|><|image_pad|><|vision_end|>"
    format_reward: float = 0.0  # reward for a well-formed response; 0 = no format reward

    def __post_init__(self):
        if self.default_mode not in MODES:
            raise ValueError(f"template.default_mode must be one of {MODES}, got {self.default_mode!r}")


def mode_flag(text: str) -> str | None:
    """'think' / 'nothink' when the text ends with /think or /nothink, else None."""
    match = _FLAG.search(text)
    return match.group(1) if match else None


def resolve_mode(messages: Sequence[Mapping[str, Any]], cfg: TemplateConfig, mode: str | None = None) -> str:
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return mode
    users = [m for m in messages if m["role"] == "user"]
    flag = mode_flag(_text(users[-1]["content"], cfg)) if users else None
    return flag or cfg.default_mode


def generation_prefix(mode: str) -> str:
    """What the prompt ends with after `<|im_start|>assistant\\n`."""
    return EMPTY_THINK if mode == "nothink" else ""


def render_prompt(messages: Sequence[Mapping[str, Any]], cfg: TemplateConfig, mode: str | None = None) -> str:
    """messages: [{"role": system | user | assistant, "content": str | [{"type": "text", "text": ...} |
    {"type": "image"}]}], ending with a user turn. Returns the prompt text including the
    generation prefix of the resolved mode."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("render_prompt needs messages ending with a user turn")
    mode = resolve_mode(messages, cfg, mode)
    parts = []
    if cfg.system is not None and messages[0]["role"] != "system":
        parts.append(_turn("system", cfg.system))
    for message in messages:
        content = _text(message["content"], cfg)
        if message["role"] == "assistant":
            content = split_think(content)[1]  # history keeps the answer, not the thinking
        parts.append(_turn(message["role"], content))
    return "".join(parts) + f"{IM_START}assistant\n" + generation_prefix(mode)


def render_response(answer: str, thinking: str | None, mode: str) -> str:
    """The training target after the prompt (think: the think block and answer; nothink: the
    answer, since the empty think block is already in the prompt), ending with <|im_end|>."""
    if mode == "think":
        if thinking is None:
            raise ValueError("think mode needs the thinking text (use mode='nothink' for answer-only data)")
        return f"{THINK_OPEN}\n{thinking.strip()}\n{THINK_CLOSE}\n\n{answer}{IM_END}"
    if mode == "nothink":
        return f"{answer}{IM_END}"
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def split_think(text: str) -> tuple[str | None, str]:
    """(thinking or None, answer): the answer is what follows the last </think>."""
    if THINK_CLOSE not in text:
        return None, text.strip()
    head, _, answer = text.rpartition(THINK_CLOSE)
    return head.replace(THINK_OPEN, "", 1).strip(), answer.replace(IM_END, "").strip()


def is_well_formed(response: str, mode: str) -> bool:
    """think: one <think> at the start, one </think>, a non-empty answer after it. nothink (the
    empty block was in the prompt): no think tags at all and a non-empty answer."""
    body = response.replace(IM_END, "").strip()
    if mode == "nothink":
        return THINK_OPEN not in body and THINK_CLOSE not in body and bool(body)
    return (body.startswith(THINK_OPEN) and body.count(THINK_OPEN) == 1 and body.count(THINK_CLOSE) == 1
            and bool(split_think(body)[1]))


def format_reward(response: str, mode: str, cfg: TemplateConfig) -> float:
    return cfg.format_reward if is_well_formed(response, mode) else 0.0


def _turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _text(content: str | Sequence[Mapping[str, Any]], cfg: TemplateConfig) -> str:
    if isinstance(content, str):
        return content
    pieces = []
    for item in content:
        if item["type"] == "image":
            pieces.append(cfg.image_placeholder)
        elif item["type"] == "text":
            pieces.append(item["text"])
        else:
            raise ValueError(f"content items must be of type 'text' or 'image', got {item['type']!r}")
    return "".join(pieces)
