"""Generated data for the language-model job: 'a+b=' -> the digits of a+b, least significant first.

Operands are zero-padded to a fixed width and the sum is written least-significant digit first,
also at a fixed width, so that a small causal model can compute each digit from the operand digits
at fixed offsets and the carry it has just written (the usual trick for learnable addition).

Every rank generates the same global batch from (seed, step), so no data has to be shipped or
broadcast; `parallel.batching.local_batch` then gives each rank its share. Held-out problems are
the pairs whose (a * 7 + b) % 10 == 0: never used in training.
"""
from __future__ import annotations

import torch

PAD, BOS, EOS = 0, 1, 2
ALPHABET = "0123456789+-=* "
VOCAB = {ch: i + 3 for i, ch in enumerate(ALPHABET)}


def encode(text: str) -> list[int]:
    return [VOCAB[ch] for ch in text]


def decode(ids) -> str:
    inverse = {i: ch for ch, i in VOCAB.items()}
    return "".join(inverse.get(int(i), "") for i in ids)


class ArithmeticTask:
    vocab_size = len(ALPHABET) + 3

    def __init__(self, seq_length: int, max_operand: int = 99, seed: int = 0):
        self.seq_length, self.max_operand, self.seed = seq_length, max_operand, seed
        self.width = len(str(max_operand))
        longest = 3 * self.width + 5  # BOS a + b = sum(width + 1) EOS
        if longest > seq_length + 1:
            raise ValueError(f"train.seq_length ({seq_length}) is too short for problems up to "
                             f"{max_operand} (need {longest - 1})")

    @staticmethod
    def held_out(a: int, b: int) -> bool:
        return (a * 7 + b) % 10 == 0

    def _pairs(self, n: int, generator: torch.Generator, held_out: bool) -> list[tuple[int, int]]:
        pairs = []
        while len(pairs) < n:
            a, b = torch.randint(0, self.max_operand + 1, (2,), generator=generator).tolist()
            if self.held_out(a, b) == held_out:
                pairs.append((a, b))
        return pairs

    def batch(self, size: int, step: int, held_out: bool = False) -> dict[str, torch.Tensor]:
        """[size, seq_length] tokens / labels / loss_mask (answer + EOS only) / position_ids."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 2 + held_out)
        tokens = torch.full((size, self.seq_length + 1), PAD, dtype=torch.long)
        mask = torch.zeros(size, self.seq_length)
        for row, (a, b) in enumerate(self._pairs(size, generator, held_out)):
            w = self.width
            prompt = [BOS] + encode(f"{a:0{w}d}+{b:0{w}d}=")
            answer = encode(f"{a + b:0{w + 1}d}"[::-1]) + [EOS]
            ids = prompt + answer
            tokens[row, : len(ids)] = torch.tensor(ids)
            mask[row, len(prompt) - 1: len(ids) - 1] = 1.0  # positions that predict the answer
        return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:].contiguous(), "loss_mask": mask,
                "position_ids": torch.arange(self.seq_length).expand(size, -1).contiguous()}
