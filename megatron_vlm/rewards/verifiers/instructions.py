"""Instruction-following constraints (IFEval-style), checked on the final answer only.

`metadata["constraints"]` is a list of dicts, each with a `type` naming a registered check and
that check's arguments, e.g. `{"type": "max_words", "value": 50}`. The score is the fraction of
constraints met, or 1/0 with `all_or_nothing`. An unknown constraint type raises (a task
configuration error, reported by the scorer), listing the known ones; so does a sample with no
constraints (`BadReference`, found at load time by `validate_samples`).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

from megatron_vlm.rewards.extract import final_answer
from megatron_vlm.rewards.registry import BadReference, register_verifier

ConstraintFn = Callable[[str, Mapping[str, Any]], bool]
_CONSTRAINTS: dict[str, ConstraintFn] = {}


def register_constraint(name: str) -> Callable[[ConstraintFn], ConstraintFn]:
    def decorator(fn: ConstraintFn) -> ConstraintFn:
        if name in _CONSTRAINTS:
            raise ValueError(f"constraint {name!r} is already registered")
        _CONSTRAINTS[name] = fn
        return fn
    return decorator


def _words(text: str) -> list[str]:
    return re.findall(r"\w+(?:[-']\w+)*", text)


@register_constraint("max_words")
def _max_words(text, spec): return len(_words(text)) <= int(spec["value"])


@register_constraint("min_words")
def _min_words(text, spec): return len(_words(text)) >= int(spec["value"])


@register_constraint("max_chars")
def _max_chars(text, spec): return len(text) <= int(spec["value"])


def _has_keyword(text: str, keyword: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, re.IGNORECASE) is not None


@register_constraint("include_keywords")
def _include_keywords(text, spec): return all(_has_keyword(text, k) for k in spec["keywords"])


@register_constraint("exclude_keywords")
def _exclude_keywords(text, spec): return not any(_has_keyword(text, k) for k in spec["keywords"])


@register_constraint("keyword_frequency")
def _keyword_frequency(text, spec):
    count = len(re.findall(rf"(?<!\w){re.escape(spec['keyword'])}(?!\w)", text, re.IGNORECASE))
    return count >= int(spec.get("min", 0)) and count <= int(spec.get("max", 10**9))


@register_constraint("json")
def _json(text, spec):
    """The whole answer is JSON (a ```json fence is allowed); `required_keys` must be present."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(body)
    except ValueError:
        return False
    required = spec.get("required_keys", [])
    return not required or (isinstance(value, dict) and all(k in value for k in required))


@register_constraint("bullet_count")
def _bullet_count(text, spec):
    return len(re.findall(r"^\s*[-*•]\s+\S", text, re.MULTILINE)) == int(spec["value"])


@register_constraint("num_paragraphs")
def _num_paragraphs(text, spec):
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]) == int(spec["value"])


@register_constraint("starts_with")
def _starts_with(text, spec): return text.strip().lower().startswith(spec["value"].lower())


@register_constraint("ends_with")
def _ends_with(text, spec): return text.strip().lower().endswith(spec["value"].lower())


@register_constraint("no_commas")
def _no_commas(text, spec): return "," not in text


@register_constraint("lowercase")
def _lowercase(text, spec): return bool(re.search(r"[a-z]", text)) and text == text.lower()


@register_constraint("uppercase")
def _uppercase(text, spec): return bool(re.search(r"[A-Z]", text)) and text == text.upper()


@register_constraint("title")
def _title(text, spec): return re.search(r"<<[^<>\n]+>>", text) is not None


# Language by script, and for Latin-script languages by stop words: a dependency-free detector
# good enough to catch a response in the wrong language, not to tell close languages apart.
_SCRIPTS = {"zh": r"[\u4e00-\u9fff]", "ja": r"[\u3040-\u30ff]", "ko": r"[\uac00-\ud7af]",
            "ru": r"[\u0400-\u04ff]", "ar": r"[\u0600-\u06ff]", "el": r"[\u0370-\u03ff]"}
_STOPWORDS = {"en": {"the", "and", "is", "of", "to", "in", "it", "that", "with", "for"},
              "fr": {"le", "la", "les", "et", "est", "de", "des", "un", "une", "pour"},
              "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "zu"},
              "es": {"el", "los", "las", "y", "es", "de", "un", "una", "para", "que"}}


def detect_language(text: str) -> str | None:
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    for lang, pattern in _SCRIPTS.items():
        if len(re.findall(pattern, text)) > 0.3 * len(letters):
            return "zh" if lang == "ja" and not re.search(r"[\u3040-\u30ff]", text) else lang
    words = [w.lower() for w in _words(text)]
    counts = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


@register_constraint("language")
def _language(text, spec): return detect_language(text) == spec["value"]


def _validate_instructions(reference: Any, metadata: Mapping[str, Any]) -> None:
    constraints = metadata.get("constraints")
    if not isinstance(constraints, (list, tuple)) or not constraints:
        raise BadReference(f"instructions: metadata 'constraints' must be a non-empty list of "
                           f"{{'type': ...}} dicts, got {constraints!r}")
    for spec in constraints:
        if not isinstance(spec, Mapping) or spec.get("type") not in _CONSTRAINTS:
            kind = spec.get("type") if isinstance(spec, Mapping) else None
            raise BadReference(f"instructions: unknown constraint {kind!r} in {spec!r}; "
                               f"known: {', '.join(sorted(_CONSTRAINTS))}")


@register_verifier("instructions", validate=_validate_instructions)
def instructions_verifier(response: str, reference: Any, metadata: Mapping[str, Any]) -> float:
    """Fraction of `metadata["constraints"]` the final answer meets (`reference` is unused).

    An empty final answer (e.g. an unclosed think block) meets nothing.
    """
    _validate_instructions(reference, metadata)
    constraints = metadata["constraints"]
    answer = final_answer(response, max_chars=None)  # length limits need the whole answer
    if not answer:
        return 0.0
    met = []
    for spec in constraints:
        met.append(bool(_CONSTRAINTS[spec["type"]](answer, spec)))
    if metadata.get("all_or_nothing", False):
        return float(all(met))
    return sum(met) / len(met)
