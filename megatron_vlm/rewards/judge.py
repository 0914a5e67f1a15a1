"""The `judge` verifier kind: a local HF causal LM grades a final answer against the reference,
as a generative verifier does (CompassVerifier, used by Intern-S1), for open answers that rules
cannot check.

- The judge sees the question, the reference and the final answer only (the think block is
  stripped; an unclosed one leaves an empty answer, which the judge grades like any other).
- Its verdict is parsed strictly: after stripping whitespace the generated text must begin with
  one of `verdicts` (default `CORRECT` -> 1.0, `INCORRECT` -> 0.0) as a whole word, case
  sensitive; anything else (empty, 'Correct', 'I think CORRECT') is a counted failure of the
  sample, never a guess.
- Prompts are batched (`batch_size`), left-padded, decoded greedily for `max_new_tokens`, sorted by
  length so batches carry little padding; verdicts come back in input order, and batched
  verdicts equal unbatched ones.
- Timeouts: generation cannot be killed in the trainer's process, so each batch runs under HF's
  `max_time` (= `timeout_s`); a batch cut by it reports its unfinished samples as timeouts, with
  the same accounting as a rule verifier's timeout (`RewardFailure(kind="timeout")`).

The judge runs in the trainer's process and owns a device, like the reward model; the scorer
routes tasks whose verifier is `"judge"` to the judge it was given.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from megatron_vlm.rewards.extract import final_answer

DEFAULT_TEMPLATE = (
    "You are grading an answer against a reference.\n"
    "Question: {question}\nReference answer: {reference}\nCandidate answer: {answer}\n"
    "Reply with CORRECT if the candidate answer means the same as the reference, else INCORRECT.\n"
    "Verdict: ")


@dataclass(kw_only=True)
class JudgeConfig:
    path: str | None = None        # a local HF causal-LM checkpoint (for `load_judge`)
    device: str = "cpu"
    batch_size: int = 8
    max_new_tokens: int = 8        # enough for the longest verdict word
    max_prompt_tokens: int = 4096  # longer prompts lose their beginning
    timeout_s: float = 60.0        # per batch (HF max_time); cut samples are timeouts
    template: str = DEFAULT_TEMPLATE  # with {question}, {reference}, {answer}
    verdicts: dict[str, float] = field(default_factory=lambda: {"CORRECT": 1.0, "INCORRECT": 0.0})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"judge.batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"judge.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.timeout_s > 0:
            raise ValueError(f"judge.timeout_s must be > 0, got {self.timeout_s}")
        missing = [k for k in ("{question}", "{reference}", "{answer}") if k not in self.template]
        if missing:
            raise ValueError(f"judge.template must contain {missing}")
        if not self.verdicts or not all(re.fullmatch(r"\S+", v) for v in self.verdicts):
            raise ValueError(f"judge.verdicts must map single words to scores, got {self.verdicts!r}")


@dataclass(frozen=True)
class Verdict:
    score: float | None     # None when the sample failed
    error: str | None = None
    timed_out: bool = False
    elapsed_s: float = 0.0


def parse_verdict(text: str, verdicts: dict[str, float]) -> float:
    """The score of the verdict word `text` opens with; ValueError when it opens with none."""
    match = re.match(r"\s*(\S+?)(?=[\s.,;:!]|$)", text)
    if not match or match.group(1) not in verdicts:
        raise ValueError(f"unparseable judge verdict {text[:60]!r}; expected one of {sorted(verdicts)}")
    return float(verdicts[match.group(1)])


class LocalJudge:
    """Grades (question, reference, answer) triples with a causal LM on `cfg.device`."""

    def __init__(self, model: Any, tokenizer: Any, cfg: JudgeConfig):
        if tokenizer.pad_token_id is None:
            raise ValueError("the judge's tokenizer needs a pad token to batch")
        tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
        self.model, self.tokenizer, self.cfg = model.to(cfg.device).eval(), tokenizer, cfg

    @classmethod
    def from_pretrained(cls, path: str, cfg: JudgeConfig, **model_kwargs) -> "LocalJudge":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return cls(AutoModelForCausalLM.from_pretrained(path, **model_kwargs), AutoTokenizer.from_pretrained(path), cfg)

    def prompts(self, questions: Sequence[str], references: Sequence[Any], responses: Sequence[str]) -> list[str]:
        return [self.cfg.template.format(question=q, reference=_reference_text(r), answer=final_answer(a))
                for q, r, a in zip(questions, references, responses)]

    def generate(self, prompts: Sequence[str]) -> tuple[list[str], bool]:
        """Greedy continuations of `prompts` (one batch) and whether `max_time` cut the batch."""
        import torch

        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.cfg.max_prompt_tokens,
                               return_tensors="pt").to(self.cfg.device)
        start = time.monotonic()
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False,
                                      max_time=self.cfg.timeout_s, pad_token_id=self.tokenizer.pad_token_id)
        cut = time.monotonic() - start >= self.cfg.timeout_s
        new = out[:, batch["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True), cut

    def judge(self, questions: Sequence[str], references: Sequence[Any], responses: Sequence[str]) -> list[Verdict]:
        """One verdict per sample, in input order; failures are verdicts with an error."""
        verdicts: list[Verdict | None] = [None] * len(questions)
        ok = []
        for i, reference in enumerate(references):
            if reference is None or (isinstance(reference, str) and not reference.strip()):
                verdicts[i] = Verdict(None, f"judge: reference must be a non-empty answer, got {reference!r}")
            else:
                ok.append(i)
        prompts = self.prompts([questions[i] for i in ok], [references[i] for i in ok], [responses[i] for i in ok])
        order = sorted(range(len(ok)), key=lambda k: len(prompts[k]))
        for first in range(0, len(order), self.cfg.batch_size):
            chunk = order[first:first + self.cfg.batch_size]
            start = time.monotonic()
            texts, cut = self.generate([prompts[k] for k in chunk])
            elapsed = time.monotonic() - start
            for k, text in zip(chunk, texts):
                verdicts[ok[k]] = self._verdict(text, cut, elapsed)
        return verdicts  # type: ignore[return-value]

    def _verdict(self, text: str, cut: bool, elapsed: float) -> Verdict:
        try:
            return Verdict(parse_verdict(text, self.cfg.verdicts), elapsed_s=elapsed)
        except ValueError as e:
            if cut:
                return Verdict(None, f"judge timed out after {self.cfg.timeout_s} s", True, elapsed)
            return Verdict(None, str(e), False, elapsed)


def _reference_text(reference: Any) -> str:
    if isinstance(reference, (list, tuple)):
        return " / ".join(str(r) for r in reference)  # aliases
    return str(reference)


def load_judge(cfg: JudgeConfig) -> LocalJudge:
    if not cfg.path:
        raise ValueError("judge.path must name a local HF causal-LM checkpoint")
    if not Path(cfg.path, "config.json").is_file():
        raise FileNotFoundError(f"judge.path: no config.json in {cfg.path}")
    return LocalJudge.from_pretrained(cfg.path, cfg)
