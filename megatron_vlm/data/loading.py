"""Load RL prompts (and SFT examples) from parquet or JSON-lines files through HF `datasets`.

    result = load_prompts(["train.parquet", "extra.jsonl"], processor, LoadConfig(max_prompt_length=512))
    result.requests   # list[RolloutRequest]: prompt ids with one placeholder per image, PIL images
    result.counts     # {"rows", "loaded", "dropped_too_long", "skipped_bad_image"}
    result.problems   # one message per row not loaded, naming the file, the sample id and why
    sft = load_sft("sft.parquet", processor, LoadConfig(max_sequence_length=256))  # SFTExample items
    pairs = load_preferences("pref.parquet", processor)  # PreferencePair(request, chosen_ids, rejected_ids)

Row schema (the demo's files follow it): `question` (the user's text), `image` (one image) or
`images` (a list; the placeholders go before the question, in order), `reference` (or `answer`),
optional `id`, `task` (the reward scorer's task name), `mode` (think / nothink); every other column
is passed through in the request's metadata. An image is PIL, PNG/JPEG bytes, a `datasets` image
dict ({"bytes", "path"}), or a path relative to the data file's folder. Preference rows add `chosen`
and `rejected`: response text (as `render_response` writes it; <|im_end|> is appended where
missing) or a conversation (a list of {"role", "content"} messages, TRL's conversational format:
the last message's content, a string or text parts, is the response).

Bad input never disappears silently: a row whose expanded prompt (text + vision tokens) is longer
than `max_prompt_length` is dropped and counted, or raises (`on_too_long="raise"`); a row whose
image cannot be read (missing file, corrupt bytes, a shape the processor rejects) is skipped and
counted, with its id in a logged warning. `rows == loaded + dropped_too_long + skipped_bad_image`.
A missing column is an error naming the column, the sample and the file.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from megatron_vlm.data.processor import MultimodalProcessor
from megatron_vlm.data.templates import IM_END, TemplateConfig, render_prompt, render_response, resolve_mode
from megatron_vlm.rollout.protocol import RolloutRequest

logger = logging.getLogger(__name__)
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_RESERVED = ("id", "question", "image", "images", "reference", "answer", "task", "mode")  # SFT `response` passes


@dataclass(kw_only=True)
class LoadConfig:
    max_prompt_length: int | None = None   # expanded prompt tokens; None: no limit
    max_sequence_length: int | None = None # SFT: expanded prompt + response tokens; None: no limit
    on_too_long: str = "drop"              # drop (counted) | raise
    default_task: str = "default"          # the reward task of rows without a `task` column
    template: TemplateConfig = field(default_factory=TemplateConfig)

    def __post_init__(self):
        if self.on_too_long not in ("drop", "raise"):
            raise ValueError(f"load.on_too_long must be 'drop' or 'raise', got {self.on_too_long!r}")
        for name in ("max_prompt_length", "max_sequence_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"load.{name} must be >= 1 or None, got {getattr(self, name)}")


@dataclass
class SFTExample:
    sample_id: str
    prompt_ids: list[int]      # one placeholder per image, as in RolloutRequest
    response_ids: list[int]    # the target, ending with <|im_end|>
    images: list[Any]
    metadata: dict


class PreferencePair(NamedTuple):
    """One preference pair; unpacks as (request, chosen_ids, rejected_ids), what
    `trainer.preference.pair_batch` takes."""
    request: RolloutRequest    # the prompt, as load_prompts builds it (metadata keeps chosen / rejected text)
    chosen_ids: list[int]      # the preferred response, ending with <|im_end|>
    rejected_ids: list[int]


@dataclass
class LoadResult:
    requests: list[RolloutRequest] | list[SFTExample] | list[PreferencePair]
    counts: dict[str, int]
    problems: list[str]


class PromptTooLong(ValueError):
    """The expanded prompt (or SFT sequence) exceeds the configured limit."""


class BadImage(ValueError):
    """An image that cannot be opened, decoded or patched."""


def load_prompts(paths: str | Path | Sequence[str | Path], processor: MultimodalProcessor | str | Path,
                 cfg: LoadConfig | None = None, cache_dir: str | None = None) -> LoadResult:
    """Every row of every file, in order, as a RolloutRequest (see the module docstring)."""
    return _load(paths, processor, cfg or LoadConfig(), cache_dir, _request)


def load_sft(paths: str | Path | Sequence[str | Path], processor: MultimodalProcessor | str | Path,
             cfg: LoadConfig | None = None, cache_dir: str | None = None) -> LoadResult:
    """SFT rows as `SFTExample`s: the prompt as for `load_prompts`, the target from a `response`
    column (as `render_response` wrote it) or from `answer` (+ `thinking` in think mode). The
    length limit is `max_sequence_length` on prompt + response (expanded), same counters."""
    return _load(paths, processor, cfg or LoadConfig(), cache_dir, _sft_example)


def load_preferences(paths: str | Path | Sequence[str | Path], processor: MultimodalProcessor | str | Path,
                     cfg: LoadConfig | None = None, cache_dir: str | None = None) -> LoadResult:
    """Preference rows (offline DPO / MPO) as `PreferencePair`s: the prompt as for `load_prompts`,
    `chosen` and `rejected` responses tokenised. The length limit is `max_sequence_length` on the
    prompt + the longer response (expanded), same counters as load_prompts."""
    return _load(paths, processor, cfg or LoadConfig(), cache_dir, _preference_pair)


def _load(paths, processor, cfg: LoadConfig, cache_dir: str | None, build) -> LoadResult:
    if not isinstance(processor, MultimodalProcessor):
        processor = MultimodalProcessor.from_pretrained(processor)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    items, problems = [], []
    counts = {"rows": 0, "loaded": 0, "dropped_too_long": 0, "skipped_bad_image": 0}
    for path in map(Path, paths):
        for index, row in enumerate(_read_rows(path, cache_dir)):
            counts["rows"] += 1
            sample_id = str(row["id"]) if row.get("id") is not None else f"{path.name}:{index}"
            try:
                items.append(build(row, sample_id, path.parent, processor, cfg))
                counts["loaded"] += 1
            except PromptTooLong as error:
                if cfg.on_too_long == "raise":
                    raise
                counts["dropped_too_long"] += 1
                problems.append(f"{path}: dropped {error}")
            except BadImage as error:
                counts["skipped_bad_image"] += 1
                problems.append(f"{path}: skipped sample {sample_id}: {error}")
            except KeyError as error:  # a missing column: name the file too
                raise KeyError(f"{path}: {error.args[0]}") from None
    for problem in problems:
        logger.warning(problem)
    logger.info("loaded %s: %s", build.__name__.strip("_"), counts)
    return LoadResult(requests=items, counts=counts, problems=problems)


def _read_rows(path: Path, cache_dir: str | None):
    """Rows as dicts, images left undecoded (a corrupt image must fail its row, not the file)."""
    from datasets import Image, List, load_dataset

    if path.suffix not in FORMATS:
        raise ValueError(f"{path}: expected one of {sorted(FORMATS)} files")
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    dataset = load_dataset(FORMATS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    for column, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(column, List(Image(decode=False)))
    return iter(dataset)


def _request(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
             cfg: LoadConfig) -> RolloutRequest:
    if "question" not in row:
        raise KeyError(f"sample {sample_id}: prompt rows need a 'question' column, got {sorted(row)}")
    sources = row.get("images") if row.get("images") is not None else row.get("image")
    sources = [] if sources is None else sources if isinstance(sources, list) else [sources]
    images = [open_image(source, root) for source in sources]
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": row["question"]}]
    messages = [{"role": "user", "content": content}]
    mode = resolve_mode(messages, cfg.template, row.get("mode"))  # the column, else the /think flag, else default
    text = render_prompt(messages, cfg.template, mode)
    prompt_ids = processor.tokenizer(text, add_special_tokens=False).input_ids
    try:
        length = processor.expanded_length(prompt_ids, images)
    except ValueError as error:  # e.g. an aspect ratio over 200: the processor cannot patch it
        raise BadImage(f"the processor rejects an image: {error}") from error
    if cfg.max_prompt_length is not None and length > cfg.max_prompt_length:
        raise PromptTooLong(f"sample {sample_id}: prompt of {length} tokens (text + vision) is longer than "
                            f"max_prompt_length={cfg.max_prompt_length}")
    reference = row.get("reference", row.get("answer"))
    metadata = {key: value for key, value in row.items() if key not in _RESERVED}
    metadata.update(task=row.get("task") or cfg.default_task, reference=reference,
                    mode=mode, question=row["question"])
    return RolloutRequest(request_id=sample_id, prompt_ids=prompt_ids, images=images, metadata=metadata)


def _sft_example(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
                 cfg: LoadConfig) -> SFTExample:
    request = _request(row, sample_id, root, processor, cfg)
    response = row.get("response")
    if not response:
        if row.get("answer") is None:
            raise KeyError(f"sample {sample_id}: SFT rows need a 'response' or an 'answer' column, got {sorted(row)}")
        thinking = row.get("thinking") or None
        response = render_response(str(row["answer"]), thinking, request.metadata["mode"])
    response_ids = processor.tokenizer(response, add_special_tokens=False).input_ids
    length = processor.expanded_length(request.prompt_ids, request.images) + len(response_ids)
    if cfg.max_sequence_length is not None and length > cfg.max_sequence_length:
        raise PromptTooLong(f"sample {sample_id}: prompt + response of {length} tokens (text + vision) is longer "
                            f"than max_sequence_length={cfg.max_sequence_length}")
    return SFTExample(sample_id=sample_id, prompt_ids=request.prompt_ids, response_ids=response_ids,
                      images=request.images, metadata=request.metadata)


def _preference_pair(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
                     cfg: LoadConfig) -> PreferencePair:
    for column in ("chosen", "rejected"):
        if not row.get(column):
            raise KeyError(f"sample {sample_id}: preference rows need a non-empty '{column}' column, "
                           f"got {sorted(k for k, v in row.items() if v)}")
    request = _request(row, sample_id, root, processor, cfg)
    chosen, rejected = (processor.tokenizer(_response_text(row[c]), add_special_tokens=False).input_ids
                        for c in ("chosen", "rejected"))
    length = processor.expanded_length(request.prompt_ids, request.images) + max(len(chosen), len(rejected))
    if cfg.max_sequence_length is not None and length > cfg.max_sequence_length:
        raise PromptTooLong(f"sample {sample_id}: prompt + longer response of {length} tokens (text + vision) is "
                            f"longer than max_sequence_length={cfg.max_sequence_length}")
    return PreferencePair(request, chosen, rejected)


def _response_text(value: str | list) -> str:
    """A response column's text, ending with <|im_end|> (a conversation: its last message's content)."""
    if isinstance(value, list):
        value = value[-1]["content"]
    if isinstance(value, list):  # content parts: [{"type": "text", "text": ...}, ...]
        value = "".join(part.get("text") or "" for part in value)
    text = str(value)
    return text if text.endswith(IM_END) else text + IM_END


def open_image(source: Any, root: Path):
    """A decoded RGB PIL image from PIL / bytes / {"bytes", "path"} / a path relative to `root`."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    try:
        if isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
        elif isinstance(source, str):
            path = Path(source) if Path(source).is_absolute() else root / source
            image = Image.open(path)
        else:
            raise BadImage(f"unsupported image value of type {type(source).__name__}")
        image.load()  # decode now: a truncated file fails here, not inside the engine
        return image.convert("RGB")
    except BadImage:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImage(f"cannot read image: {type(error).__name__}: {error}") from error
