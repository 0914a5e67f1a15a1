"""Responses that hit the generation limit: DAPO's soft penalty, masking, and GLM-4.5V's forced answer.

Three independent tools; a recipe picks any of them.
- `soft_overlong_penalty` (DAPO, arXiv 2503.14476): a reward term that falls linearly from 0 to
  -penalty_factor over the last `buffer_len` tokens before `max_response_len`:
      R = 0                                   if L <= L_max - L_buf
      R = (L_max - L_buf - L) / L_buf * f     if L_max - L_buf < L <= L_max
      R = -f                                  if L > L_max
  Added to the verifier reward before advantages (verl's overlong_buffer).
- `mask_truncated` (DAPO's overlong filtering): a truncated response has no verdict on its answer,
  so its tokens leave the loss instead of being punished as wrong.
- Forced answer (GLM-4.1V-Thinking / GLM-4.5V, arXiv 2507.01006): when a response is cut off inside
  its think block, close the block (`</think>\n`), optionally open the answer (e.g. `<answer>`),
  and let the model finish the answer within a small budget; the response is then verifiable.
  The pure part lives here: `plan_forced_answers` decides which samples need it and builds the
  continuation prompt ids; `merge_forced_answer` joins the answer onto the response with a loss
  mask that is 0 on the inserted (not sampled) tokens. A forced-answer sample ended properly: do
  not also mask it as truncated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_vlm.rl.tokens import seq_index


# ------------------------------------------------------------------------------ soft penalty
@dataclass(kw_only=True)
class OverlongPenaltyConfig:
    max_response_len: int       # L_max, the generation limit in tokens
    buffer_len: int             # L_buf: the penalty ramps over the last buffer_len tokens
    penalty_factor: float = 1.0

    def __post_init__(self):
        if not 0 < self.buffer_len <= self.max_response_len:
            raise ValueError(f"overlong.buffer_len must be in (0, max_response_len={self.max_response_len}], "
                             f"got {self.buffer_len}")
        if not self.penalty_factor >= 0:
            raise ValueError(f"overlong.penalty_factor must be >= 0, got {self.penalty_factor}")


def soft_overlong_penalty(lengths: torch.Tensor, cfg: OverlongPenaltyConfig) -> torch.Tensor:
    """[S] response lengths (tokens) -> [S] penalties in [-penalty_factor, 0]."""
    expected = cfg.max_response_len - cfg.buffer_len
    exceed = lengths.double() - expected
    return (-exceed / cfg.buffer_len * cfg.penalty_factor).clamp(-cfg.penalty_factor, 0.0).float()


# ----------------------------------------------------------------------------------- masking
def is_truncated(lengths: torch.Tensor, max_response_len: int, finished: torch.Tensor | None = None) -> torch.Tensor:
    """[S] bool: the response stopped at the limit rather than by its own end-of-sequence. With
    the engine's `finished` flags ([S] bool, True = stopped on EOS / a stop string) that is
    ~finished; without them, length >= the limit."""
    if finished is not None:
        return ~finished.bool()
    return lengths >= max_response_len


def mask_truncated(mask: torch.Tensor, cu_seqlens: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """The loss mask [T] with every token of a truncated sequence ([S] bool) set to 0."""
    keep = ~truncated.bool()[seq_index(cu_seqlens).to(truncated.device)]
    return mask * keep.to(mask.dtype)


# ------------------------------------------------------------------------------ forced answer
@dataclass(kw_only=True)
class ForcedAnswerConfig:
    answer_budget: int = 512          # new tokens the model may spend on the forced answer
    think_end: str = "</think>"       # a response containing this has left its think block
    delimiter: str = "</think>\n"     # inserted where the thinking was cut off
    answer_prefix: str = ""           # then this, e.g. "<answer>" (GLM) or "The final answer is "

    def __post_init__(self):
        if not self.answer_budget >= 1:
            raise ValueError(f"forced_answer.answer_budget must be >= 1, got {self.answer_budget}")
        if self.think_end not in self.delimiter:
            raise ValueError(f"forced_answer.delimiter must close the think block ({self.think_end!r}), "
                             f"got {self.delimiter!r}")


@dataclass
class ForcedContinuation:
    index: int                # the sample's position in the rollout batch
    prompt_ids: list[int]     # prompt + response so far + inserted: the engine's new prompt
    inserted_ids: list[int]   # delimiter + answer prefix tokens (not sampled by the policy)
    max_new_tokens: int


def needs_forced_answer(response_text: str, finished: bool, cfg: ForcedAnswerConfig) -> bool:
    """Cut off by the length limit while still thinking: no verifiable answer without help. A
    response cut off after its think block closed is left alone (its answer was being written)."""
    return not finished and cfg.think_end not in response_text


def plan_forced_answers(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                        response_texts: Sequence[str], finished: Sequence[bool],
                        encode: Callable[[str], list[int]], cfg: ForcedAnswerConfig) -> list[ForcedContinuation]:
    """One continuation request per sample that needs a forced answer, in batch order.

    `encode` is the tokenizer without special tokens (e.g. `lambda s: tok.encode(s,
    add_special_tokens=False)`); the inserted text is encoded on its own, so its ids are the same
    for every sample and the engine continues from exact ids, not re-tokenised text.
    """
    if not len(prompt_ids) == len(response_ids) == len(response_texts) == len(finished):
        raise ValueError(f"plan_forced_answers: batch fields differ in length: {len(prompt_ids)}, "
                         f"{len(response_ids)}, {len(response_texts)}, {len(finished)}")
    inserted = list(encode(cfg.delimiter + cfg.answer_prefix))
    return [ForcedContinuation(i, list(prompt_ids[i]) + list(response_ids[i]) + inserted, inserted, cfg.answer_budget)
            for i in range(len(prompt_ids)) if needs_forced_answer(response_texts[i], bool(finished[i]), cfg)]


def forced_answer_text(response_text: str, cfg: ForcedAnswerConfig) -> str:
    """The text form of the continuation's response part (for text-in / text-out engines)."""
    return response_text + cfg.delimiter + cfg.answer_prefix


def merge_forced_answer(response_ids: Sequence[int], continuation: ForcedContinuation,
                        answer_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(full response ids, loss mask): response + inserted + answer, mask 0 on the inserted ids."""
    ids = list(response_ids) + continuation.inserted_ids + list(answer_ids)
    mask = [1] * len(response_ids) + [0] * len(continuation.inserted_ids) + [1] * len(answer_ids)
    return ids, mask
