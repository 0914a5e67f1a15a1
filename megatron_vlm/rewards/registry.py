"""The reward registry: verifiers by name, user rewards by dotted path.

A reward function has one signature, shared by built-in verifiers and user extensions:

    def reward(response: str, reference: Any, metadata: Mapping[str, Any]) -> float

`response` is the full model output (think block included: each function decides what it reads,
and the built-ins read only the final answer after `</think>`), `reference` is the task's gold
answer (any picklable value), `metadata` the task's per-sample options. The return value is a
finite real number (bool and int are accepted; a string, even "1.0", is not); raising, hanging or
returning NaN makes the scorer give the configured failure score and count the sample id in its
metrics. A reference the function cannot use should raise `BadReference` naming the function and
the form it expects: the scorer counts those apart (`reward/<task>/bad_references`). A verifier
may register a cheap `validate(reference, metadata)` that the scorer runs before dispatch and
`validate_samples` runs at load time. Functions must be
importable at module level (workers run in spawned processes and look them up by name).

A reward is named either by its registered name (`"math"`) or by a dotted path
(`"my_pkg.verifiers:boxed_answer"`), resolved by `resolve_reward_fn`.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

RewardFn = Callable[[str, Any, Mapping[str, Any]], float]
ValidateFn = Callable[[Any, Mapping[str, Any]], None]

_VERIFIERS: dict[str, RewardFn] = {}
_VALIDATORS: dict[str, ValidateFn] = {}


class BadReference(ValueError):
    """A sample's reference (or metadata) is not in the form its verifier expects. The message
    starts with the verifier's name and says the expected form; the scorer counts such samples
    per task (`reward/<task>/bad_references`) and never pays them."""


def register_verifier(name: str, *, validate: ValidateFn | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register `fn` under `name`; a second registration of the same name is an error.

    `validate(reference, metadata)` raises `BadReference` for a sample the verifier cannot score;
    it runs in the trainer's process (at load time through `validate_sample`, and before a job is
    sent to a worker), so it must be cheap.
    """
    def decorator(fn: RewardFn) -> RewardFn:
        if name in _VERIFIERS:
            raise ValueError(f"verifier {name!r} is already registered (by {_VERIFIERS[name].__module__})")
        if ":" in name:
            raise ValueError(f"verifier name {name!r} must not contain ':' (reserved for dotted paths)")
        _VERIFIERS[name] = fn
        if validate is not None:
            _VALIDATORS[name] = validate
        return fn
    return decorator


def validate_sample(spec: str, reference: Any, metadata: Mapping[str, Any]) -> None:
    """Raise `BadReference` when the verifier `spec` cannot score (reference, metadata); user
    rewards (dotted paths) and verifiers without a validator accept everything here."""
    _load_builtins()
    validate = _VALIDATORS.get(spec)
    if validate is not None:
        validate(reference, metadata)


def registered_verifiers() -> list[str]:
    _load_builtins()
    return sorted(_VERIFIERS)


def get_verifier(name: str) -> RewardFn:
    _load_builtins()
    if name not in _VERIFIERS:
        raise KeyError(f"unknown verifier {name!r}; known verifiers: {', '.join(sorted(_VERIFIERS))}")
    return _VERIFIERS[name]


def resolve_reward_fn(spec: str) -> RewardFn:
    """A registered verifier name, or `package.module:function` for a user reward."""
    if ":" not in spec:
        return get_verifier(spec)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward path {spec!r} must look like 'my_pkg.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward path {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward path {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    check_reward_signature(fn, spec)
    return fn


def check_reward_signature(fn: Any, spec: str) -> None:
    """The contract: callable with (response, reference, metadata) positionally."""
    if not callable(fn):
        raise TypeError(f"reward {spec!r} is not callable: {fn!r}")
    try:
        inspect.signature(fn).bind("response", "reference", {})
    except TypeError as e:
        raise TypeError(f"reward {spec!r} must accept (response, reference, metadata): {e}") from e
    except ValueError:  # builtins without a signature: trust them
        pass


def _load_builtins() -> None:
    # The built-in verifiers register on import; imported lazily so that `registry` has no cycle.
    from megatron_vlm.rewards import verifiers  # noqa: F401


CONTRACT_EXAMPLES = (
    ("The answer is \\boxed{4}.", "4", {}),
    ("<think>maybe 3</think>4", "4", {"note": "a think block"}),
    ("", None, {}),
)


def check_reward_contract(spec: str, examples=CONTRACT_EXAMPLES) -> list[float]:
    """The contract test for a user reward, runnable in the user's own test suite:

        from megatron_vlm.rewards.registry import check_reward_contract
        def test_my_reward(): check_reward_contract("my_pkg.verifiers:boxed_answer", my_examples)

    Checks that `spec` resolves by name (so that a worker process can import it), accepts
    (response, reference, metadata), returns a finite real number (bool and int count) for each
    example, and returns the same number when called twice. Returns the scores.
    """
    import math
    import numbers

    fn = resolve_reward_fn(spec)
    scores = []
    for response, reference, metadata in examples:
        value = fn(response, reference, dict(metadata))
        if not isinstance(value, numbers.Real):
            raise TypeError(f"reward {spec!r} returned {type(value).__name__} {value!r} for "
                            f"{response[:60]!r}; it must return a real number")
        if not math.isfinite(float(value)):
            raise ValueError(f"reward {spec!r} returned {value} for {response[:60]!r}; it must be finite")
        if fn(response, reference, dict(metadata)) != value:
            raise ValueError(f"reward {spec!r} is not deterministic on {response[:60]!r}")
        scores.append(float(value))
    return scores
