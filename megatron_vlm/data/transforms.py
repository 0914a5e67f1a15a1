"""Data transforms for RL prompts: open-ended rewrites of multiple choice, questions rendered into
the image, and seeded dataset mixtures.

- `mcq_to_fill_blank` (Ovis2.5, arXiv 2508.11737): a multiple-choice question rewards guessing
  (1/k by chance, and a letter is easy to match), so it is rewritten as a fill-in-the-blank
  question whose reference is the correct option's text. Questions that cannot stand without
  their options ("Which of the following ...", "All of the above", "Both A and B") are not
  rewritable: the function returns None and the caller keeps or drops the original.
- `render_text_into_image` (Ovis2.5): the question is drawn into a white band above (or below) the
  image and the text prompt becomes a generic instruction, so the model must read the question
  from pixels. Uses PIL's built-in scalable font: no font files to ship.
- `mixture` (InternVL3.5 mixes text : multimodal at 1 : 2.5): exactly proportional counts per source
  (largest remainder), indices drawn per source without replacement within an epoch, order shuffled;
  all from the seed, so every rank computes the same global list. `allocate_counts` and
  `PoolDrawer` are shared with `megatron_vlm.rl.curriculum`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

# ------------------------------------------------------------------------ multiple choice -> open
_CHOICE_LINE = re.compile(r"^\s*\(?([A-Ha-h])\s*[\).:：、]\s*(.+?)\s*$")
_INSTRUCTIONS = re.compile(  # one instruction sentence, not the rest of its line
    r"^\s*(options|choices)\s*:?\s*$|(please )?answer with the (option'?s )?letter[^.?!\n]*[.!]?|"
    r"(please )?(choose|select) (the )?(correct|best|right) (answer|option|choice)[^.?!:\n]*[.:!]?", re.I | re.M)
_NEEDS_OPTIONS = re.compile(
    r"which of the (following|options|choices|above)|the following (options|choices|statements)|"
    r"select all|choose all|which option|which choice", re.I)
_NOT_STANDALONE = re.compile(
    r"\b(all|none|both|neither) of (the )?(above|these|them|options|choices)\b|"
    r"^\s*(both|either|neither)?\s*\(?[A-H]\)?\s*(and|or|&|,)\s*\(?[A-H]\)?\s*$|^\s*\(?[A-H]\)?\s*$", re.I)
_BLANK = re.compile(r"_{2,}|\(\s*\)|（\s*）")
FILL_BLANK = "____"
OPEN_INSTRUCTION = "Fill in the blank with the answer itself (a value or phrase), not an option letter."


@dataclass
class OpenQuestion:
    question: str
    reference: str           # the correct option's text: the verifier's gold answer
    original_letter: str


def parse_choices(text: str) -> tuple[str, dict[str, str]]:
    """Question text with one option per line ("A. ...", "(B) ...", "C) ...") -> (stem, {letter: text})."""
    stem, choices = [], {}
    for line in text.splitlines():
        match = _CHOICE_LINE.match(line)
        if match and (choices or len(stem) > 0):
            choices[match.group(1).upper()] = match.group(2)
        elif not choices:
            stem.append(line)
    return "\n".join(stem).strip(), choices


def mcq_to_fill_blank(question: str, answer: str | int, choices: Mapping[str, str] | Sequence[str] | None = None
                      ) -> OpenQuestion | None:
    """Rewrite a multiple-choice question as fill-in-the-blank, or None when it cannot stand alone.

    `choices` as {letter: text} or a list (A, B, ...); when None they are parsed from `question`.
    `answer` is the correct letter, a 0-based index, or the option text itself.
    """
    if choices is None:
        question, choices = parse_choices(question)
    elif not isinstance(choices, Mapping):
        choices = {chr(ord("A") + i): text for i, text in enumerate(choices)}
    if not choices:
        return None
    letter = _answer_letter(answer, choices)
    if letter is None:
        raise ValueError(f"answer {answer!r} matches none of the choices {sorted(choices)}")
    reference = choices[letter].strip()
    stem = _INSTRUCTIONS.sub("", question).strip()
    if not stem or _NEEDS_OPTIONS.search(stem) or _NOT_STANDALONE.search(reference):
        return None
    if _BLANK.search(stem):
        return OpenQuestion(_BLANK.sub(FILL_BLANK, stem), reference, letter)
    return OpenQuestion(f"{stem}\n{OPEN_INSTRUCTION}", reference, letter)


def _answer_letter(answer, choices: Mapping[str, str]) -> str | None:
    if isinstance(answer, int):
        return chr(ord("A") + answer) if chr(ord("A") + answer) in choices else None
    text = str(answer).strip().strip("()").rstrip(".")
    if text.upper() in choices and len(text) == 1:
        return text.upper()
    for letter, option in choices.items():
        if option.strip() == str(answer).strip():
            return letter
    return None


# --------------------------------------------------------------------------- question in image
TEXT_IN_IMAGE_PROMPT = "Read the question in the image and answer it."


def render_text_into_image(image, text: str, *, position: str = "top", font_size: int | None = None,
                           margin: int = 8, background="white", color="black"):
    """A new image: `image` with `text` word-wrapped to its width in a band above or below it."""
    from PIL import Image, ImageDraw, ImageFont

    if position not in ("top", "bottom"):
        raise ValueError(f"position must be 'top' or 'bottom', got {position!r}")
    width = image.width
    font = ImageFont.load_default(size=font_size or max(12, width // 32))
    lines = _wrap(text, font, width - 2 * margin)
    ascent, descent = font.getmetrics()
    line_height = ascent + descent + 2
    band = Image.new("RGB", (width, 2 * margin + line_height * len(lines)), background)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, font=font, fill=color)
    out = Image.new("RGB", (width, image.height + band.height), background)
    top = position == "top"
    out.paste(band, (0, 0 if top else image.height))
    out.paste(image.convert("RGB"), (0, band.height if top else 0))
    return out


def question_into_image(image, question: str, **render_kwargs):
    """(image with the question drawn into it, the text prompt that replaces the question)."""
    return render_text_into_image(image, question, **render_kwargs), TEXT_IN_IMAGE_PROMPT


def _wrap(text: str, font, max_width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip() if line else word
            if font.getlength(candidate) <= max_width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > max_width and len(line) > 1:  # a word wider than the image
                cut = max(1, int(len(line) * max_width / font.getlength(line)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------------- mixtures
def allocate_counts(shares: Mapping[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to `shares` (largest remainder; ties go to
    the name listed first)."""
    weight = sum(shares.values())
    if total < 0 or not weight > 0 or any(s < 0 for s in shares.values()):
        raise ValueError(f"allocate_counts needs total >= 0 and non-negative shares with a positive sum, "
                         f"got {total} and {dict(shares)}")
    exact = {name: total * share / weight for name, share in shares.items()}
    counts = {name: int(value) for name, value in exact.items()}
    names = list(shares)
    order = sorted(names, key=lambda name: (-(exact[name] - counts[name]), names.index(name)))
    for name in order[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


@dataclass
class PoolDrawer:
    """Draws from named pools without replacement within each pool's epoch, reshuffling each epoch
    from (seed, pool, epoch): deterministic, and resumable from `cursor`."""
    pools: Mapping[str, Sequence[Hashable]]
    seed: int = 0
    cursor: dict[str, int] = field(default_factory=dict)  # items drawn so far from each pool

    def draw(self, counts: Mapping[str, int]) -> list[tuple[str, Hashable]]:
        out = []
        for name, count in counts.items():
            pool = self.pools[name]
            if count and not pool:
                raise ValueError(f"pool {name!r} is empty but {count} items were asked of it")
            for _ in range(count):
                position = self.cursor.get(name, 0)
                epoch, offset = divmod(position, len(pool))
                out.append((name, pool[self._order(name, epoch)[offset]]))
                self.cursor[name] = position + 1
        return out

    def _order(self, name: str, epoch: int) -> list[int]:
        order = list(range(len(self.pools[name])))
        random.Random(f"{self.seed}/{name}/{epoch}").shuffle(order)
        return order


@dataclass(kw_only=True)
class MixtureConfig:
    ratios: dict[str, float]   # source -> relative share, e.g. {"text": 1, "multimodal": 2.5}
    seed: int = 0

    def __post_init__(self):
        if not self.ratios or any(not r >= 0 for r in self.ratios.values()) or not sum(self.ratios.values()) > 0:
            raise ValueError(f"mixture.ratios must be non-negative with a positive sum, got {self.ratios}")


def mixture(sizes: Mapping[str, int], cfg: MixtureConfig, num_samples: int) -> list[tuple[str, int]]:
    """num_samples (source, index) pairs: counts proportional to cfg.ratios, indices < sizes[source]."""
    missing = sorted(set(cfg.ratios) - set(sizes))
    if missing:
        raise ValueError(f"mixture.ratios names sources without a size: {missing}; sizes: {sorted(sizes)}")
    drawer = PoolDrawer({name: range(sizes[name]) for name in cfg.ratios}, seed=cfg.seed)
    picked = drawer.draw(allocate_counts(cfg.ratios, num_samples))
    random.Random(f"{cfg.seed}/order").shuffle(picked)
    return picked
