"""Reward models: a local HF sequence-classification model scoring (prompt, response), and
relative scoring against a reference response (POLAR, arXiv 2507.05197).

- The model sees only the final answer: for open-ended prompts the policy thinks first, and the
  think block is stripped before scoring (Intern-S1), so the RM cannot be swayed by the reasoning.
- Batches are right-padded and the model pools the last non-pad token (HF's `*ForSequenceClass-
  ification` uses `config.pad_token_id` for that); texts are sorted by length so batches carry
  little padding, and scores come back in input order. Batched scores equal unbatched ones.
- Inputs longer than `max_length` are cut from the left, keeping the end of the response.
- POLAR input: `prompt + reference <|reward|> prompt + response` (the template is a parameter):
  the score says how close the response is to the reference, not how good it is in the absolute.

torch and transformers are imported here only: the verifier workers never import this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_vlm.rewards.extract import final_answer

POLAR_TEMPLATE = "{prompt}{reference}<|reward|>{prompt}{response}"


@dataclass(kw_only=True)
class RewardModelConfig:
    batch_size: int = 8
    max_length: int = 4096    # tokens; longer inputs lose their beginning
    device: str = "cpu"
    strip_think: bool = True  # score only the answer after </think>
    path: str | None = None   # a local HF sequence-classification checkpoint (for `load_reward_model`)
    relative: bool = False    # POLAR-style: score against the sample's reference response

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"reward_model.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"reward_model.max_length must be >= 2, got {self.max_length}")


def pair_text(tokenizer: Any, prompt: str, response: str) -> str:
    """The RM input for (prompt, response): the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{prompt}\n{response}"


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, texts: Sequence[str], cfg: RewardModelConfig) -> torch.Tensor:
    """Scalar score (logit of label 0) per text, fp32 on CPU, in input order. [N]"""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    scores = torch.empty(len(texts), dtype=torch.float32)
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start:start + cfg.batch_size]
        batch = tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                          max_length=cfg.max_length, return_tensors="pt").to(cfg.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, labels]
        scores[torch.tensor(chunk)] = logits[:, 0].float().cpu()
    return scores


class SequenceRewardModel:
    """Scores (prompt, response) with a sequence-classification model on `cfg.device`."""

    def __init__(self, model: Any, tokenizer: Any, cfg: RewardModelConfig):
        if tokenizer.pad_token_id is None:
            raise ValueError("the reward model's tokenizer needs a pad token to batch")
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        model.config.pad_token_id = tokenizer.pad_token_id  # pooling finds the last non-pad token
        self.model, self.tokenizer, self.cfg = model.to(cfg.device).eval(), tokenizer, cfg

    @classmethod
    def from_pretrained(cls, path: str, cfg: RewardModelConfig, **model_kwargs) -> "SequenceRewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, **model_kwargs)
        return cls(model, tokenizer, cfg)

    def _answer(self, response: str) -> str:
        # uncut here: the tokenizer keeps the last max_length tokens
        return final_answer(response, max_chars=None) if self.cfg.strip_think else response

    def texts(self, prompts: Sequence[str], responses: Sequence[str],
              references: Sequence[Any] | None = None) -> list[str]:
        return [pair_text(self.tokenizer, p, self._answer(r)) for p, r in zip(prompts, responses)]

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              references: Sequence[Any] | None = None) -> list[float]:
        return score_texts(self.model, self.tokenizer, self.texts(prompts, responses, references), self.cfg).tolist()


def load_reward_model(cfg: RewardModelConfig) -> "SequenceRewardModel":
    """The reward model a run's `reward_model:` section names."""
    if not cfg.path:
        raise ValueError("reward_model.path must name a local HF sequence-classification checkpoint")
    if not Path(cfg.path, "config.json").is_file():
        raise FileNotFoundError(f"reward_model.path: no config.json in {cfg.path}")
    cls = RelativeRewardModel if cfg.relative else SequenceRewardModel
    return cls.from_pretrained(cfg.path, cfg)


class RelativeRewardModel(SequenceRewardModel):
    """POLAR-style: scores a response by its closeness to a reference response for the prompt."""

    def __init__(self, model: Any, tokenizer: Any, cfg: RewardModelConfig, template: str = POLAR_TEMPLATE):
        super().__init__(model, tokenizer, cfg)
        self.template = template

    def texts(self, prompts, responses, references=None) -> list[str]:
        if references is None or any(r is None for r in references):
            raise ValueError("relative reward model needs a reference response for every sample")
        return [self.template.format(prompt=p, reference=self._answer(str(ref)), response=self._answer(r))
                for p, r, ref in zip(prompts, responses, references)]
