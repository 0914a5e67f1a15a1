"""Load RL prompts (and SFT examples) from parquet or JSON-lines files through HF `datasets`.

    result = load_prompts(["train.parquet", "extra.jsonl"], processor, LoadConfig(max_prompt_length=512))
    result.requests   # list[RolloutRequest]: prompt ids with one placeholder per image, PIL images
    result.counts     # {"rows", "loaded", "dropped_too_long", "skipped_bad_image"}
    result.problems   # one message per row not loaded, naming the file, the sample id and why
    sft = load_sft("sft.parquet", processor, LoadConfig(max_sequence_length=256))  # SFTExample items
    sft = load_sft_requests("sft.parquet", processor)  # RolloutRequests, metadata["response"] the target
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
counted, with its id, row and column in a logged warning. `rows == loaded + dropped_too_long +
skipped_bad_image`. A missing column, or a null / empty question (SFT: response, preference:
chosen / rejected), is a `MissingColumn` error naming the file, the sample, the row (0-based, as in
the default sample id `file:row`) and the column; a JSON / JSON-lines file that is not UTF-8 is a
`DataError` naming the file and the byte offset. `check_prompt_counts` turns a loaded set with no
usable row (how many were read, dropped and why), fewer prompts than one step draws, or an empty
eval set into one `DataError` before the run builds its model.

Transforms (`megatron_vlm.data.transforms`, Ovis2.5), off by default, applied to each row before
its prompt is built (all three loaders; a `response` / `chosen` / `rejected` text is not rewritten):

- `mcq_to_fill_blank`: a row with choices (a `choices` column, a list or {letter: text}, else
  options one per line in the question, as `parse_choices` reads them) and an answer (`reference`,
  else `answer`: a letter, a 0-based index or the option text) becomes an open question whose
  `reference` (and `answer`) is the option text, with `task` set to `mcq_task` when given (map that
  task to a short-answer / numeric verifier). The metadata keeps `original_question`,
  `original_reference`, `original_letter` and `choices` ({letter: text}). A row without choices
  passes through unchanged; a question that cannot stand without its options ("Which of the
  following ...") is kept as it was or dropped (`mcq_not_rewritable`); an answer naming no
  choice skips the row.
- `question_into_image`: the question (after the rewrite above, without its /think flag) is drawn
  in a band above the first image and the text prompt becomes `question_image_prompt` (+ the flag);
  the metadata's `image_question` holds the drawn text. A row without an image gets a blank white
  canvas `canvas_width` wide (default: text-only sources of a mixture still teach reading), or is
  skipped (`question_image_without_image="skip"`).

Counters are added only for the transforms switched on, for the rows loaded: `mcq_rewritten +
mcq_without_choices + mcq_not_rewritable == loaded` and `question_in_image + question_in_canvas ==
loaded`. Rows a transform removes are counted under `dropped_mcq_not_rewritable`,
`skipped_bad_mcq` or `skipped_no_image`, so `rows == loaded + every dropped_* and skipped_*`.

Kinds (`select_kinds`, `vlm.kinds`): a loaded set cut to the rows whose `kind` column (or any
other column, e.g. `task`) is listed, the rest counted under `dropped_kind`; a listed kind absent
from the file is a DataError naming the config field and the kinds the file has.

Mixtures (`load_mixture`, InternVL3.5 mixes text : multimodal at 1 : 2.5): each `SourceConfig`
is loaded with `load_prompts`, then `transforms.mixture` draws counts exactly proportional to the
ratios, deterministic from the seed; each request's metadata `source` is the source's name.
"""
from __future__ import annotations

import codecs
import io
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from megatron_vlm.data.processor import MultimodalProcessor
from megatron_vlm.data.templates import (IM_END, TemplateConfig, mode_flag, render_prompt, render_response,
                                         resolve_mode)
from megatron_vlm.data.transforms import (TEXT_IN_IMAGE_PROMPT, MixtureConfig, allocate_counts, mcq_to_fill_blank,
                                          mixture, parse_choices, render_text_into_image)
from megatron_vlm.rollout.protocol import RolloutRequest

logger = logging.getLogger(__name__)
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_RESERVED = ("id", "question", "image", "images", "reference", "answer", "task", "mode")  # SFT `response` passes
_MODE_FLAG = re.compile(r"\s*/(think|nothink)\s*$")


@dataclass(kw_only=True)
class LoadConfig:
    max_prompt_length: int | None = None   # expanded prompt tokens; None: no limit
    max_sequence_length: int | None = None # SFT: expanded prompt + response tokens; None: no limit
    on_too_long: str = "drop"              # drop (counted) | raise
    default_task: str = "default"          # the reward task of rows without a `task` column
    template: TemplateConfig = field(default_factory=TemplateConfig)
    mcq_to_fill_blank: bool = False        # Ovis2.5: multiple choice -> open question, option text as reference
    mcq_task: str | None = None            # the task of rewritten rows; None: the row's own task
    mcq_not_rewritable: str = "keep"       # a question that needs its options: keep (as MCQ) | drop; counted
    question_into_image: bool = False      # Ovis2.5: the question drawn into the first image
    question_image_prompt: str = TEXT_IN_IMAGE_PROMPT  # the text prompt that replaces the question
    question_image_without_image: str = "canvas"  # rows without an image: canvas (blank, white) | skip; counted
    canvas_width: int = 448                # pixels; the canvas is as tall as the drawn text

    def __post_init__(self):
        if self.on_too_long not in ("drop", "raise"):
            raise ValueError(f"load.on_too_long must be 'drop' or 'raise', got {self.on_too_long!r}")
        for name in ("max_prompt_length", "max_sequence_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"load.{name} must be >= 1 or None, got {getattr(self, name)}")
        if self.mcq_not_rewritable not in ("keep", "drop"):
            raise ValueError(f"load.mcq_not_rewritable must be 'keep' or 'drop', got {self.mcq_not_rewritable!r}")
        if self.question_image_without_image not in ("canvas", "skip"):
            raise ValueError(f"load.question_image_without_image must be 'canvas' or 'skip', "
                             f"got {self.question_image_without_image!r}")
        if not self.question_image_prompt.strip():
            raise ValueError("load.question_image_prompt must be non-empty text")
        if self.mcq_task is not None and not self.mcq_task.strip():
            raise ValueError(f"load.mcq_task must be a task name or None, got {self.mcq_task!r}")
        if self.canvas_width < 32:
            raise ValueError(f"load.canvas_width must be >= 32 pixels, got {self.canvas_width}")


@dataclass(kw_only=True)
class KindsConfig:
    """The question kinds each split keeps (`vlm.kinds`), for data with a `kind` column (or any
    column of the row, e.g. `task`): demonstrations for some kinds, verifiable prompts for all.
    None keeps every row; a listed kind the file does not have is an error naming the field."""
    sft: list[str] | None = None     # vlm.sft_data rows kept (the demonstrations; preference pairs too)
    rl: list[str] | None = None      # vlm.prompt_data / prompt_sources rows kept (GRPO / RFT prompts)
    eval: list[str] | None = None    # vlm.eval_data rows kept (held-out)
    column: str = "kind"             # the row's column that names its kind

    def __post_init__(self):
        for split in ("sft", "rl", "eval"):
            kinds = getattr(self, split)
            if kinds is not None and (not kinds or not all(isinstance(k, str) and k for k in kinds)):
                raise ValueError(f"vlm.kinds.{split} must be a non-empty list of kind names or null, got {kinds!r}")
            if kinds is not None and len(set(kinds)) != len(kinds):
                raise ValueError(f"vlm.kinds.{split} names a kind twice: {kinds}")
        if not self.column:
            raise ValueError("vlm.kinds.column must name a column")


@dataclass(kw_only=True)
class SourceConfig:
    """One source of a mixture: a prompt file (or several) and its relative share."""
    path: str | list[str]                  # parquet / jsonl file(s), as load_prompts takes them
    ratio: float = 1.0                     # relative share; 0 loads the source (checked) but never draws it
    name: str | None = None                # metadata `source`; None: the first file's stem

    def __post_init__(self):
        if not self.path:
            raise ValueError(f"source.path must name a file, got {self.path!r}")
        if self.name is None:
            self.name = Path(self.path if isinstance(self.path, str) else self.path[0]).stem
        if not self.name:
            raise ValueError(f"source.name must be non-empty, got {self.name!r} (path {self.path})")
        if not (math.isfinite(self.ratio) and self.ratio >= 0):
            raise ValueError(f"source {self.label}: ratio must be finite and >= 0, got {self.ratio}")

    @property
    def label(self) -> str:
        return f"{self.name!r} ({self.path})"


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


class DataError(ValueError):
    """A data file the run cannot use as it is; the message names the file, and the row and column
    where one row is at fault."""


class MissingColumn(DataError, KeyError):
    """A row without a column it needs, or with a null / empty value there. A KeyError too, as a
    missing column always was; printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PromptTooLong(ValueError):
    """The expanded prompt (or SFT sequence) exceeds the configured limit."""


class BadImage(ValueError):
    """An image that cannot be opened, decoded or patched."""


class RowRemoved(ValueError):
    """A transform removes the row; `counter` is the key it is counted under."""

    def __init__(self, counter: str, message: str):
        super().__init__(message)
        self.counter = counter


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


def load_sft_requests(paths: str | Path | Sequence[str | Path], processor: MultimodalProcessor | str | Path,
                      cfg: LoadConfig | None = None, cache_dir: str | None = None) -> LoadResult:
    """SFT rows as RolloutRequests, what the run's sft stage takes: the prompt as for `load_prompts`,
    metadata `response` the target text, as `load_sft` finds it (the `response` column, else
    `answer` + `thinking` rendered). A row without a target raises MissingColumn naming the file,
    the sample, the row and the column; limits and counters as `load_sft`."""
    return _load(paths, processor, cfg or LoadConfig(), cache_dir, _sft_request)


def load_preferences(paths: str | Path | Sequence[str | Path], processor: MultimodalProcessor | str | Path,
                     cfg: LoadConfig | None = None, cache_dir: str | None = None) -> LoadResult:
    """Preference rows (offline DPO / MPO) as `PreferencePair`s: the prompt as for `load_prompts`,
    `chosen` and `rejected` responses tokenised. The length limit is `max_sequence_length` on the
    prompt + the longer response (expanded), same counters as load_prompts."""
    return _load(paths, processor, cfg or LoadConfig(), cache_dir, _preference_pair)


def load_mixture(sources: Sequence[SourceConfig | dict], processor: MultimodalProcessor | str | Path,
                 cfg: LoadConfig | None = None, num_samples: int | None = None, seed: int = 0,
                 cache_dir: str | None = None) -> LoadResult:
    """`num_samples` prompts drawn from `sources` in proportion to their ratios (`transforms.mixture`:
    exact largest-remainder counts, rows without replacement within a source's epoch, shuffled; the
    same list for the same seed). None: the most samples no source has to repeat a row for.

    Each source is loaded with `load_prompts(source.path, processor, cfg)`; an error doing so is
    re-raised as a SourceError naming the source. Requests get metadata `source` = the source's
    name (over a `source` column) and request ids `<name>/<id>`, with `~k` on the k-th repeat of a
    row, so that ids stay unique. counts: the loaders' counters summed over the sources, plus
    `loaded/<name>`, `drawn/<name>` and `samples`; problems are prefixed with the source's name.
    """
    sources = _check_sources([s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in sources])
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"load_mixture: num_samples must be >= 0 or None, got {num_samples}")
    if not isinstance(processor, MultimodalProcessor):
        processor = MultimodalProcessor.from_pretrained(processor)
    pools, counts, problems, why_empty = {}, {}, [], {}
    for source in sources:
        try:
            loaded = load_prompts(source.path, processor, cfg, cache_dir)
        except Exception as error:  # noqa: BLE001 - any failure to load is re-raised naming its source
            raise SourceError(f"mixture source {source.label}: {type(error).__name__}: {error}") from error
        pools[source.name] = [replace(r, metadata={**r.metadata, "source": source.name}) for r in loaded.requests]
        for key, value in loaded.counts.items():
            counts[key] = counts.get(key, 0) + value
        counts[f"loaded/{source.name}"] = loaded.counts["loaded"]
        problems += [f"source {source.name!r}: {problem}" for problem in loaded.problems]
        try:
            require_rows(loaded, source.label)
        except DataError as error:
            why_empty[source.name] = str(error)
    empty = [s for s in sources if s.ratio > 0 and not pools[s.name]]
    if empty:
        raise SourceError(f"mixture sources {', '.join(s.label for s in empty)} have a positive ratio but no "
                          f"loadable rows: {' | '.join(why_empty[s.name] for s in empty)}")
    sizes = {name: len(pool) for name, pool in pools.items()}
    ratios = {s.name: s.ratio for s in sources}
    total = _one_epoch(sizes, ratios) if num_samples is None else num_samples
    requests = _distinct_ids(pools, mixture(sizes, MixtureConfig(ratios=ratios, seed=seed), total))
    for name in pools:
        counts[f"drawn/{name}"] = sum(r.metadata["source"] == name for r in requests)
    counts["samples"] = len(requests)
    logger.info("mixture of %s: %s", [s.name for s in sources], counts)
    return LoadResult(requests=requests, counts=counts, problems=problems)


class SourceError(ValueError):
    """A mixture source that cannot be loaded or drawn from; the message names it."""


def require_rows(result: LoadResult, source: str | Path, what: str = "prompt") -> LoadResult:
    """`result`, or a DataError when it holds no usable row: how many rows `source` had, how many
    each filter removed, and the first problems the loader logged."""
    if result.requests:
        return result
    rows = result.counts.get("rows", 0)
    if not rows:
        raise DataError(f"{source}: no {what} rows (the file holds none)")
    removed = {k: v for k, v in result.counts.items() if v and k.startswith(("dropped_", "skipped_"))}
    why = ", ".join(f"{v} {k}" for k, v in removed.items()) or "none loaded"
    first = "; ".join(result.problems[:3])
    raise DataError(f"{source}: no usable {what} rows: {rows} read, {sum(removed.values())} removed ({why})"
                    + (f"; first problems: {first}" if first else ""))


def select_kinds(result: LoadResult, kinds: Sequence[str] | None, column: str, *, source: str | Path,
                 field: str) -> LoadResult:
    """`result` with only the rows whose `column` (in the request's metadata) is one of `kinds`;
    the others are counted under `dropped_kind` (so `rows == loaded + dropped_*` still holds).
    None keeps every row. A DataError naming `field` when a listed kind has no row in `source`."""
    if kinds is None:
        return result
    found = {str(_metadata(item).get(column)) for item in result.requests if _metadata(item).get(column) is not None}
    missing = [k for k in kinds if k not in found]
    if missing:
        there = f"its {column!r} values: {sorted(found)}" if found else f"it has no {column!r} column"
        raise DataError(f"{field}: {missing} not found in {source} ({there})")
    kept = [item for item in result.requests if str(_metadata(item).get(column)) in kinds]
    counts = {**result.counts, "loaded": len(kept),
              "dropped_kind": result.counts.get("dropped_kind", 0) + len(result.requests) - len(kept)}
    return LoadResult(requests=kept, counts=counts, problems=result.problems)


def _metadata(item) -> dict:
    return item.request.metadata if isinstance(item, PreferencePair) else item.metadata


def check_prompt_counts(prompts: LoadResult, evals: LoadResult, prompts_per_step: int, *,
                        prompt_source: str | Path = "prompt data", eval_source: str | Path = "eval data",
                        sft: LoadResult | None = None, sft_source: str | Path = "sft data") -> None:
    """Before the model is built: a DataError when the prompt set has no usable row or fewer than
    `prompts_per_step` (what one GRPO step draws), when the eval set is empty (an eval accuracy of
    NaN otherwise), or when `sft` is given (the run has an sft stage) and has no usable row."""
    require_rows(prompts, prompt_source, "prompt")
    require_rows(evals, eval_source, "eval")
    if sft is not None:
        require_rows(sft, sft_source, "sft")
    if len(prompts.requests) < prompts_per_step:
        raise DataError(f"{prompt_source}: {len(prompts.requests)} usable prompts, fewer than "
                        f"rollout.prompts_per_step={prompts_per_step} ({prompts.counts})")


def _check_sources(sources: list[SourceConfig]) -> list[SourceConfig]:
    if not sources:
        raise ValueError("load_mixture needs at least one source")
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"mixture source names must be unique (set `name`), repeated: {repeated}")
    if not sum(s.ratio for s in sources) > 0:
        raise ValueError(f"mixture sources need a positive ratio somewhere, got {[(s.name, s.ratio) for s in sources]}")
    return sources


def _one_epoch(sizes: dict[str, int], ratios: dict[str, float]) -> int:
    """The largest total whose proportional counts fit every source without repeating a row."""
    weight = sum(ratios.values())
    total = min(math.floor(sizes[n] * weight / r + 1e-9) for n, r in ratios.items() if r > 0)
    while total > 0 and any(c > sizes[n] for n, c in allocate_counts(ratios, total).items()):
        total -= 1  # largest remainder can round one source up past its size
    return total


def _distinct_ids(pools: dict[str, list[RolloutRequest]], picked: list[tuple[str, int]]) -> list[RolloutRequest]:
    seen: dict[tuple[str, int], int] = {}
    out = []
    for name, index in picked:
        request = pools[name][index]
        repeat = seen[name, index] = seen.get((name, index), -1) + 1
        request_id = f"{name}/{request.request_id}" + (f"~{repeat}" if repeat else "")
        out.append(replace(request, request_id=request_id, metadata=dict(request.metadata)))
    return out


def _load(paths, processor, cfg: LoadConfig, cache_dir: str | None, build) -> LoadResult:
    if not isinstance(processor, MultimodalProcessor):
        processor = MultimodalProcessor.from_pretrained(processor)
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    items, problems = [], []
    counts = {"rows": 0, "loaded": 0, "dropped_too_long": 0, "skipped_bad_image": 0} | _transform_counters(cfg)
    for path in map(Path, paths):
        for index, row in enumerate(_read_rows(path, cache_dir)):
            counts["rows"] += 1
            sample_id = str(row["id"]) if row.get("id") is not None else f"{path.name}:{index}"
            try:
                _check_question(row, sample_id)
                transformed, applied = _transform(row, sample_id, path.parent, cfg)
                items.append(build(transformed, sample_id, path.parent, processor, cfg))
                counts["loaded"] += 1
                for counter in applied:
                    counts[counter] += 1
            except RowRemoved as error:
                counts[error.counter] += 1
                problems.append(f"{path}: {error.counter.split('_')[0]} sample {sample_id}: {error}")
            except PromptTooLong as error:
                if cfg.on_too_long == "raise":
                    raise
                counts["dropped_too_long"] += 1
                problems.append(f"{path}: dropped {error}")
            except BadImage as error:
                counts["skipped_bad_image"] += 1
                problems.append(f"{path}: skipped sample {sample_id}: row {index}, column "
                                f"{_image_column(row)!r}: {error}")
            except (DataError, KeyError) as error:  # a missing or empty column: name the file and row
                kind = type(error) if isinstance(error, DataError) else MissingColumn
                raise kind(f"{path}: {error.args[0] if error.args else error} (row {index})") from None
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
    if FORMATS[path.suffix] == "json" and not _utf8_text(path):
        return iter(())  # `datasets` fails on an empty JSON file with a bare StopIteration
    try:
        dataset = load_dataset(FORMATS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - whatever `datasets` or arrow raise, name the file
        cause = f" ({type(error.__cause__).__name__}: {error.__cause__})" if error.__cause__ else ""
        raise DataError(f"{path}: cannot be read as {FORMATS[path.suffix]}: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}{cause}") from error
    for column, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
        elif isinstance(feature, List) and isinstance(feature.feature, Image):
            dataset = dataset.cast_column(column, List(Image(decode=False)))
    return iter(dataset)


def _utf8_text(path: Path, chunk_bytes: int = 1 << 20) -> bool:
    """Whether the file holds more than whitespace; a DataError naming the byte offset (and line)
    of the first byte that is not UTF-8. Read in chunks: a JSON-lines file may be large."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0  # bytes and line ends before this chunk
    content = False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # a multi-byte character cut by the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                at = offset - pending + error.start
                line = newlines + chunk[:max(0, error.start - pending)].count(b"\n") + 1
                raise DataError(f"{path}: not UTF-8 text: byte 0x{error.object[error.start]:02x} at offset {at} "
                                f"(line {line}): {error.reason}; save the file as UTF-8") from None
            if not chunk:
                return content
            content = content or bool(chunk.strip())
            offset, newlines = offset + len(chunk), newlines + chunk.count(b"\n")


def _image_column(row: dict) -> str:
    return "images" if row.get("images") is not None else "image"


def _image_sources(row: dict) -> list:
    sources = row.get("images") if row.get("images") is not None else row.get("image")
    return [] if sources is None else sources if isinstance(sources, list) else [sources]


# ------------------------------------------------------------------------------ row transforms
def _transform_counters(cfg: LoadConfig) -> dict[str, int]:
    names = []
    if cfg.mcq_to_fill_blank:
        names += ["mcq_rewritten", "mcq_without_choices", "mcq_not_rewritable",
                  "dropped_mcq_not_rewritable", "skipped_bad_mcq"]
    if cfg.question_into_image:
        names += ["question_in_image", "question_in_canvas", "skipped_no_image"]
    return dict.fromkeys(names, 0)


def _transform(row: dict, sample_id: str, root: Path, cfg: LoadConfig) -> tuple[dict, list[str]]:
    """(the row as the switched-on transforms leave it, the counter of each). Raises RowRemoved."""
    if not (cfg.mcq_to_fill_blank or cfg.question_into_image) or "question" not in row:
        return row, []  # a missing question is _request's error to raise
    row, applied = dict(row), []
    if cfg.mcq_to_fill_blank:
        applied.append(_rewrite_mcq(row, cfg))
    if cfg.question_into_image:
        applied.append(_draw_question(row, root, cfg))
    return row, applied


def _rewrite_mcq(row: dict, cfg: LoadConfig) -> str:
    """Rewrite `row` in place as an open question when it is multiple choice; returns the counter."""
    question, flag = _split_mode_flag(str(row["question"]))
    stem, in_text = parse_choices(question)
    listed = _choices_column(row.get("choices"))
    answer = row.get("reference") if row.get("reference") is not None else row.get("answer")
    if not listed and not in_text:
        return "mcq_without_choices"
    if answer is None:
        raise RowRemoved("skipped_bad_mcq", "a multiple-choice row needs a 'reference' or 'answer' column")
    try:
        rewritten = mcq_to_fill_blank(stem if in_text else question, answer, listed or in_text)
    except ValueError as error:
        if not listed:  # lines like "a) ..." in an open question with its own answer: not multiple choice
            return "mcq_without_choices"
        raise RowRemoved("skipped_bad_mcq", str(error)) from error
    if rewritten is None:
        if cfg.mcq_not_rewritable == "drop":
            raise RowRemoved("dropped_mcq_not_rewritable", "the question cannot stand without its options")
        return "mcq_not_rewritable"
    row.update(original_question=row["question"], original_reference=answer, choices=dict(listed or in_text),
               original_letter=rewritten.original_letter, question=rewritten.question + flag,
               reference=rewritten.reference)
    if row.get("answer") is not None:
        row["answer"] = rewritten.reference  # the SFT target of answer-only rows
    if cfg.mcq_task:
        row["task"] = cfg.mcq_task
    return "mcq_rewritten"


def _choices_column(value) -> dict[str, str]:
    """{letter: text} from a `choices` value: None, a list (A, B, ...) or a mapping (None values dropped:
    a `datasets` struct column has every row's keys)."""
    if value is None:
        return {}
    if isinstance(value, str):
        raise RowRemoved("skipped_bad_mcq", f"'choices' must be a list or a mapping, got the string {value[:60]!r}")
    if isinstance(value, dict):
        return {str(letter).strip().upper(): str(text) for letter, text in value.items() if text is not None}
    return {chr(ord("A") + i): str(text) for i, text in enumerate(value)}


def _draw_question(row: dict, root: Path, cfg: LoadConfig) -> str:
    """Draw the question into the first image (or a blank canvas) in place; returns the counter."""
    from PIL import Image

    question, flag = _split_mode_flag(str(row["question"]))
    sources = _image_sources(row)
    if sources:
        first, counter = open_image(sources[0], root), "question_in_image"
    elif cfg.question_image_without_image == "skip":
        raise RowRemoved("skipped_no_image", "question_into_image is on and the row has no image")
    else:  # one white row: the drawn band makes the height
        first, counter = Image.new("RGB", (cfg.canvas_width, 1), "white"), "question_in_canvas"
    row.update(images=[render_text_into_image(first, question), *sources[1:]], image=None,
               image_question=question, question=cfg.question_image_prompt + flag)
    return counter


def _split_mode_flag(question: str) -> tuple[str, str]:
    """("What is 2+2?", " /nothink") from "What is 2+2? /nothink": the flag stays in the text prompt."""
    flag = mode_flag(question)
    return (_MODE_FLAG.sub("", question), f" /{flag}") if flag else (question, "")


def _check_question(row: dict, sample_id: str) -> None:
    """Every loader's rows need question text; checked before a transform reads it."""
    if "question" not in row:
        raise MissingColumn(f"sample {sample_id}: prompt rows need a 'question' column, got {sorted(row)}")
    question = row["question"]
    if question is None or (isinstance(question, str) and not question.strip()):
        raise MissingColumn(f"sample {sample_id}: column 'question' is {'null' if question is None else 'empty'}; "
                            f"every row needs question text")
    if not isinstance(question, str):
        raise DataError(f"sample {sample_id}: column 'question' must be text, got {type(question).__name__} "
                        f"{str(question)[:60]!r}")


def _request(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
             cfg: LoadConfig) -> RolloutRequest:
    _check_question(row, sample_id)
    images = [open_image(source, root) for source in _image_sources(row)]
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
    reference = row.get("reference") if row.get("reference") is not None else row.get("answer")  # a None cell too
    metadata = {key: value for key, value in row.items() if key not in _RESERVED}
    metadata.update(task=row.get("task") or cfg.default_task, reference=reference,
                    mode=mode, question=row["question"])
    return RolloutRequest(request_id=sample_id, prompt_ids=prompt_ids, images=images, metadata=metadata)


def _sft_parts(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
               cfg: LoadConfig) -> tuple[RolloutRequest, str, list[int]]:
    """(the prompt's request, the target text, its ids): the `response` column, else `answer`."""
    request = _request(row, sample_id, root, processor, cfg)
    response = row.get("response")
    if response is None or not str(response).strip():
        if row.get("answer") is None:
            found = (f"column 'response' is {'null' if response is None else 'empty'} and there is no 'answer'"
                     if "response" in row else f"got columns {sorted(row)}")
            raise MissingColumn(f"sample {sample_id}: SFT rows need a 'response' or an 'answer' column ({found})")
        thinking = row.get("thinking") or None
        response = render_response(str(row["answer"]), thinking, request.metadata["mode"])
    response_ids = processor.tokenizer(response, add_special_tokens=False).input_ids
    length = processor.expanded_length(request.prompt_ids, request.images) + len(response_ids)
    if cfg.max_sequence_length is not None and length > cfg.max_sequence_length:
        raise PromptTooLong(f"sample {sample_id}: prompt + response of {length} tokens (text + vision) is longer "
                            f"than max_sequence_length={cfg.max_sequence_length}")
    return request, response, response_ids


def _sft_example(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
                 cfg: LoadConfig) -> SFTExample:
    request, _, response_ids = _sft_parts(row, sample_id, root, processor, cfg)
    return SFTExample(sample_id=sample_id, prompt_ids=request.prompt_ids, response_ids=response_ids,
                      images=request.images, metadata=request.metadata)


def _sft_request(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
                 cfg: LoadConfig) -> RolloutRequest:
    request, response, _ = _sft_parts(row, sample_id, root, processor, cfg)
    return replace(request, metadata={**request.metadata, "response": response})


def _preference_pair(row: dict, sample_id: str, root: Path, processor: MultimodalProcessor,
                     cfg: LoadConfig) -> PreferencePair:
    for column in ("chosen", "rejected"):
        if not row.get(column):
            found = f"'{column}' is {'null' if row.get(column) is None else 'empty'}" if column in row else \
                f"got columns {sorted(row)}"
            raise MissingColumn(f"sample {sample_id}: preference rows need a non-empty '{column}' column ({found})")
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
